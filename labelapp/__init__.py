"""`rlhf label`: the human-feedback web app (docs/labelling-app.md): a SQLite store, a JSON API, the page, exports."""
