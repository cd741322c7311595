/* rlhf label: the annotator's page. Plain JS, no build step, no external resources.
 * API contract: /work/label_spec.md (GET /api/me, GET /api/next, POST /api/labels; Bearer token). */
(function () {
  "use strict";

  var TOKEN_KEY = "rlhf_label_token";
  var STRENGTHS = ["significantly better", "better", "slightly better", "negligibly better"];
  var FLAGS = [
    ["fails_instruction", "Fails instruction"],
    ["harmful", "Harmful"],
    ["made_up_facts", "Made-up facts"],
    ["inappropriate", "Inappropriate"],
  ];
  var RATING_WORDS = {1: "very bad", 4: "okay", 7: "excellent"};

  var token = null;
  var item = null;        // the item shown now
  var state = null;       // the annotator's answers for it
  var sending = false;    // a submission is in flight (no double submit)
  var drag = null;        // the ranking drag in progress

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (k === "class") node.className = attrs[k];
        else node.setAttribute(k, attrs[k]);
      });
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function show(id, on) { $(id).hidden = !on; }
  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  // ---------------------------------------------------------------- markdown (safe)
  // The whole text is escaped first; only then are our own tags added, so nothing of the text can become markup.
  function escapeHtml(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function inline(s) {  // s is escaped already
    var parts = s.split(/(`[^`\n]+`)/g);
    return parts.map(function (p, i) {
      if (i % 2 === 1) return "<code>" + p.slice(1, -1) + "</code>";
      return p.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
        .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?![\w])/g, "$1<em>$2</em>");
    }).join("");
  }

  function renderMarkdown(src) {
    var lines = escapeHtml(src).replace(/\r\n?/g, "\n").split("\n");
    var out = [];
    var para = [];
    var list = null;  // {tag, items}
    function flushPara() {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    }
    function flushList() {
      if (list) out.push("<" + list.tag + ">" + list.items.map(function (t) {
        return "<li>" + inline(t) + "</li>";
      }).join("") + "</" + list.tag + ">");
      list = null;
    }
    for (var i = 0; i < lines.length; i++) {
      var line = lines[i];
      var fence = /^\s*```/.test(line);
      if (fence) {
        flushPara(); flushList();
        var code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) { code.push(lines[i]); i++; }
        out.push("<pre><code>" + code.join("\n") + "</code></pre>");
        continue;
      }
      var bullet = /^\s*[-*+] +(.*)$/.exec(line);
      var numbered = /^\s*\d+[.)] +(.*)$/.exec(line);
      var heading = /^(#{1,6}) +(.*)$/.exec(line);
      if (bullet || numbered) {
        flushPara();
        var tag = bullet ? "ul" : "ol";
        if (list && list.tag !== tag) flushList();
        if (!list) list = {tag: tag, items: []};
        list.items.push((bullet || numbered)[1]);
      } else if (heading) {
        flushPara(); flushList();
        out.push('<p class="md-h">' + inline(heading[2]) + "</p>");
      } else if (/^\s*$/.test(line)) {
        flushPara(); flushList();
      } else if (list && /^\s{2,}\S/.test(line)) {
        list.items[list.items.length - 1] += " " + line.trim();  // a wrapped list item
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara(); flushList();
    return out.join("");
  }

  function setMarkdown(node, text) {
    node.innerHTML = renderMarkdown(text);  // escaped text + our tags only
  }

  // ---------------------------------------------------------------- status and token
  var statusTimer = null;
  function setStatus(text, kind, ttl) {
    var s = $("status");
    clearTimeout(statusTimer);
    if (ttl) statusTimer = setTimeout(function () { setStatus(""); }, ttl);
    s.textContent = text || "";
    s.className = "status" + (kind ? " " + kind : "");
    s.hidden = !text;
  }

  function showOnly(view) {
    ["token-view", "item-view", "done-view"].forEach(function (v) { show(v, v === view); });
  }

  function askToken(message) {
    token = null;
    try { localStorage.removeItem(TOKEN_KEY); } catch (e) { /* private mode */ }
    item = null;
    show("who", false);
    show("progress", false);
    setStatus("");
    $("token-error").textContent = message || "";
    show("token-error", !!message);
    showOnly("token-view");
    $("token-input").value = "";
    $("token-input").focus();
  }

  function initialToken() {
    var params = new URLSearchParams(window.location.search);
    var t = params.get("token");
    if (t) {
      try { localStorage.setItem(TOKEN_KEY, t); } catch (e) { /* private mode */ }
      params.delete("token");  // keep the token out of the address bar and history
      var rest = params.toString();
      history.replaceState(null, "", window.location.pathname + (rest ? "?" + rest : "") + window.location.hash);
      return t;
    }
    try { return localStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
  }

  function Unauthorized() {}

  // fetch with the token; network failures are retried (forever, with backoff) so a server restart is ridden out
  async function api(method, path, body) {
    var delay = 500;
    for (var attempt = 1; ; attempt++) {
      var resp, data;
      try {
        resp = await fetch(path, {
          method: method,
          headers: Object.assign({"Authorization": "Bearer " + token},
                                 body ? {"Content-Type": "application/json"} : {}),
          body: body ? JSON.stringify(body) : undefined,
          cache: "no-store",
        });
        if (resp.status === 401) throw new Unauthorized();
        if (resp.status >= 500) throw new Error("server error " + resp.status);
        data = await resp.json().catch(function () { return {}; });
      } catch (err) {
        if (err instanceof Unauthorized) throw err;
        setStatus("Cannot reach the server (" + (err && err.message ? err.message : "network error") +
                  "). Retrying" + (attempt > 1 ? " (attempt " + attempt + ")" : "") + "…", "warn");
        await sleep(delay);
        delay = Math.min(delay * 2, 4000);
        continue;
      }
      return {status: resp.status, ok: resp.ok, data: data};
    }
  }

  function handleError(err) {
    if (err instanceof Unauthorized) {
      askToken("That token was not accepted (401 Unauthorized). Check it and try again.");
    } else {
      setStatus("Something went wrong: " + (err && err.message ? err.message : err), "error");
    }
  }

  function setProgress(p) {
    if (!p) return;
    $("progress-labelled").textContent = p.labelled;
    $("progress-total").textContent = p.total;
    var share = p.total ? Math.min(1, p.labelled / p.total) : 0;
    $("progress-fill").style.width = (100 * share).toFixed(1) + "%";
    $("progress-bar").setAttribute("aria-valuenow", String(p.labelled));
    $("progress-bar").setAttribute("aria-valuemax", String(p.total));
    show("progress", true);
  }

  async function start() {
    setStatus("Loading…");
    try {
      var me = await api("GET", "/api/me");
      if (!me.ok) throw new Error((me.data && me.data.error) || "GET /api/me answered " + me.status);
      $("annotator-name").textContent = me.data.annotator + (me.data.admin ? " (admin)" : "");
      show("who", true);
      setProgress({labelled: me.data.labelled, total: me.data.total});
      await loadNext();
    } catch (err) { handleError(err); }
  }

  async function loadNext() {
    setStatus("Loading the next item…");
    var r = await api("GET", "/api/next");
    if (!r.ok) throw new Error((r.data && r.data.error) || "GET /api/next answered " + r.status);
    setProgress(r.data.progress);
    setStatus("");
    if (!r.data.item) {
      item = null;
      showOnly("done-view");
      return;
    }
    showItem(r.data.item);
  }

  // ---------------------------------------------------------------- items
  function showItem(it) {
    item = it;
    $("item-id").textContent = "item " + it.id;
    setMarkdown($("prompt"), it.prompt);
    var pair = it.kind === "pair";
    show("pair-view", pair);
    show("ranking-view", !pair);
    if (pair) buildPair(it); else buildRanking(it);
    showOnly("item-view");
    updateSubmit();
    window.scrollTo(0, 0);
  }

  function responseBody(text) {
    var body = el("div", {class: "md response-text"});
    setMarkdown(body, text);
    return body;
  }

  // pair: the two responses side by side
  function buildPair(it) {
    state = {kind: "pair", chosen: null, strength: null, unsafe: [false, false]};
    var grid = $("pair-grid");
    grid.textContent = "";
    it.responses.forEach(function (text, i) {
      var card = el("article", {class: "card response-card", "data-index": String(i)});
      var head = el("div", {class: "card-head"});
      head.appendChild(el("h3", null, "Response " + (i + 1)));
      var choose = el("button", {type: "button", class: "choose", "data-choice": String(i), "aria-pressed": "false"});
      choose.appendChild(el("kbd", null, String(i + 1)));
      choose.appendChild(document.createTextNode(" This one is better"));
      choose.addEventListener("click", function () { choosePair(i); });
      head.appendChild(choose);
      card.appendChild(head);
      card.appendChild(responseBody(text));
      var foot = el("label", {class: "check unsafe-check"});
      var box = el("input", {type: "checkbox", class: "unsafe", "data-index": String(i)});
      box.addEventListener("change", function () { state.unsafe[i] = box.checked; });
      foot.appendChild(box);
      foot.appendChild(document.createTextNode(" Unsafe"));
      card.appendChild(foot);
      card.addEventListener("click", function (ev) {  // a click anywhere on the card but its controls chooses it
        if (ev.target.closest("button, input, label, a, pre") || window.getSelection().toString()) return;
        choosePair(i);
      });
      grid.appendChild(card);
    });
    document.querySelectorAll(".strength").forEach(function (b) {
      b.setAttribute("aria-checked", "false");
      b.classList.remove("selected");
      b.disabled = true;
    });
    $("strength-question").textContent = "First choose the better response.";
  }

  function choosePair(i) {
    if (!state || state.kind !== "pair" || sending) return;
    state.chosen = i;
    document.querySelectorAll(".response-card").forEach(function (c) {
      var on = Number(c.getAttribute("data-index")) === i;
      c.classList.toggle("chosen", on);
      c.querySelector(".choose").setAttribute("aria-pressed", on ? "true" : "false");
    });
    document.querySelectorAll(".strength").forEach(function (b) { b.disabled = false; });
    $("strength-question").textContent =
      "How much better is Response " + (i + 1) + " than Response " + (2 - i) + "?";
    updateSubmit();
  }

  function chooseStrength(s) {
    if (!state || state.kind !== "pair" || state.chosen === null || sending) return;
    state.strength = s;
    document.querySelectorAll(".strength").forEach(function (b) {
      var on = b.getAttribute("data-strength") === s;
      b.classList.toggle("selected", on);
      b.setAttribute("aria-checked", on ? "true" : "false");
    });
    updateSubmit();
  }

  // ranking: a list the annotator orders, each response rated 1-7 with flags
  function buildRanking(it) {
    var k = it.responses.length;
    state = {kind: "ranking", ratings: new Array(k).fill(null), flags: it.responses.map(function () { return []; })};
    var list = $("ranking-list");
    list.textContent = "";
    it.responses.forEach(function (text, i) {
      var li = el("li", {class: "card rank-item", tabindex: "0", "data-index": String(i),
                         "aria-label": "Response " + letter(i)});
      var side = el("div", {class: "rank-side"});
      var handle = el("div", {class: "handle", title: "Drag to reorder", "aria-hidden": "true"}, "⠿");
      handle.addEventListener("pointerdown", function (ev) { startDrag(ev, li); });
      side.appendChild(handle);
      side.appendChild(el("div", {class: "position"}));
      var arrows = el("div", {class: "arrows"});
      var up = el("button", {type: "button", class: "move move-up", title: "Move up (Alt+↑)",
                             "aria-label": "Move response " + letter(i) + " up"}, "↑");
      var down = el("button", {type: "button", class: "move move-down", title: "Move down (Alt+↓)",
                               "aria-label": "Move response " + letter(i) + " down"}, "↓");
      up.addEventListener("click", function () { move(li, -1, up); });
      down.addEventListener("click", function () { move(li, 1, down); });
      arrows.appendChild(up);
      arrows.appendChild(down);
      side.appendChild(arrows);
      li.appendChild(side);

      var main = el("div", {class: "rank-main"});
      main.appendChild(el("h3", null, "Response " + letter(i)));
      main.appendChild(responseBody(text));
      li.appendChild(main);

      var controls = el("div", {class: "rank-controls"});
      var group = el("fieldset", {class: "rating"});
      group.appendChild(el("legend", null, "Overall rating"));
      var scale = el("div", {class: "rating-scale"});
      for (var v = 1; v <= 7; v++) {
        var lab = el("label", {class: "rating-option", title: v + (RATING_WORDS[v] ? " – " + RATING_WORDS[v] : "")});
        var radio = el("input", {type: "radio", name: "rating-" + i, value: String(v), class: "rating-input",
                                 "data-index": String(i), "aria-label": "rating " + v});
        radio.addEventListener("change", (function (val) {
          return function () { state.ratings[i] = val; li.classList.add("rated"); updateSubmit(); };
        })(v));
        lab.appendChild(radio);
        lab.appendChild(el("span", null, String(v)));
        scale.appendChild(lab);
      }
      group.appendChild(scale);
      controls.appendChild(group);
      var flags = el("div", {class: "flags"});
      FLAGS.forEach(function (f) {
        var lab = el("label", {class: "check"});
        var box = el("input", {type: "checkbox", class: "flag", "data-index": String(i), "data-flag": f[0]});
        box.addEventListener("change", function () {
          var set = state.flags[i].filter(function (x) { return x !== f[0]; });
          if (box.checked) set.push(f[0]);
          state.flags[i] = FLAGS.map(function (g) { return g[0]; }).filter(function (x) { return set.indexOf(x) >= 0; });
        });
        lab.appendChild(box);
        lab.appendChild(document.createTextNode(" " + f[1]));
        flags.appendChild(lab);
      });
      controls.appendChild(flags);
      li.appendChild(controls);

      li.addEventListener("keydown", function (ev) {  // Alt+ArrowUp/Down on the item or anything in it
        if (!ev.altKey || (ev.key !== "ArrowUp" && ev.key !== "ArrowDown")) return;
        ev.preventDefault();
        move(li, ev.key === "ArrowUp" ? -1 : 1, ev.target);
      });
      list.appendChild(li);
    });
    renumber();
  }

  function letter(i) { return String.fromCharCode(65 + i); }

  function rankItems() { return Array.prototype.slice.call($("ranking-list").children); }

  function currentOrder() {  // original indices, top (best) first
    return rankItems().map(function (li) { return Number(li.getAttribute("data-index")); });
  }

  function renumber() {
    var items = rankItems();
    items.forEach(function (li, pos) {
      li.querySelector(".position").textContent = "#" + (pos + 1);
      li.querySelector(".move-up").disabled = pos === 0;
      li.querySelector(".move-down").disabled = pos === items.length - 1;
    });
  }

  function move(li, step, refocus) {
    if (sending) return;
    var list = $("ranking-list");
    if (step < 0 && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
    else if (step > 0 && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
    else return;
    renumber();
    var target = refocus && !refocus.disabled ? refocus : li;
    target.focus();
    setStatus("Response " + letter(Number(li.getAttribute("data-index"))) + " moved to #" +
              (rankItems().indexOf(li) + 1), "info", 1500);
  }

  // pointer-event drag and drop (mouse, pen and touch): the item follows the pointer and the list reorders live
  function startDrag(ev, li) {
    if (sending || ev.button > 0) return;
    ev.preventDefault();
    drag = {li: li, pointer: ev.pointerId, y: ev.clientY, scrolling: false};
    li.classList.add("dragging");
    document.body.classList.add("is-dragging");
    document.addEventListener("pointermove", onDragMove);
    document.addEventListener("pointerup", endDrag);
    document.addEventListener("pointercancel", endDrag);
  }

  function onDragMove(ev) {
    if (!drag || ev.pointerId !== drag.pointer) return;
    ev.preventDefault();
    drag.y = ev.clientY;
    reposition(ev.clientY);
    if (!drag.scrolling) { drag.scrolling = true; requestAnimationFrame(autoScroll); }
  }

  function reposition(y) {  // put the dragged item where the pointer is among the others
    var list = $("ranking-list");
    var others = rankItems().filter(function (x) { return x !== drag.li; });
    var before = null;
    for (var j = 0; j < others.length; j++) {
      var r = others[j].getBoundingClientRect();
      if (y < r.top + r.height / 2) { before = others[j]; break; }
    }
    if (before !== drag.li.nextElementSibling) {
      list.insertBefore(drag.li, before);
      renumber();
    }
  }

  function autoScroll() {  // while the pointer is held near the top or bottom edge, the page scrolls on its own
    if (!drag) return;
    var top = document.querySelector(".topbar").getBoundingClientRect().bottom + 50;
    var bottom = window.innerHeight - 50;
    var step = drag.y < top ? -Math.min(24, top - drag.y) : drag.y > bottom ? Math.min(24, drag.y - bottom) : 0;
    if (step) {
      var before = window.scrollY;
      window.scrollBy(0, step);
      if (window.scrollY !== before) reposition(drag.y);
    }
    if (step) requestAnimationFrame(autoScroll); else drag.scrolling = false;
  }

  function endDrag(ev) {
    if (!drag || (ev && ev.pointerId !== drag.pointer)) return;
    var li = drag.li;
    li.classList.remove("dragging");
    document.body.classList.remove("is-dragging");
    document.removeEventListener("pointermove", onDragMove);
    document.removeEventListener("pointerup", endDrag);
    document.removeEventListener("pointercancel", endDrag);
    drag = null;
    renumber();
    li.focus({preventScroll: true});
  }

  // ---------------------------------------------------------------- submit
  function missing() {
    if (!state) return "";
    if (state.kind === "pair") {
      if (state.chosen === null) return "Choose the better response (1 or 2).";
      if (!state.strength) return "Say how much better it is.";
      return "";
    }
    var left = state.ratings.filter(function (r) { return r === null; }).length;
    return left ? "Rate every response (" + left + " left)." : "";
  }

  function updateSubmit() {
    var why = missing();
    $("submit").disabled = sending || !!why;
    $("submit-hint").textContent = sending ? "Saving…" : why;
  }

  function newClientId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    var bytes = new Uint8Array(16);
    if (window.crypto && window.crypto.getRandomValues) window.crypto.getRandomValues(bytes);
    else for (var i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" + hex.slice(16, 20) + "-" + hex.slice(20);
  }

  function labelBody() {
    if (state.kind === "pair") {
      return {item_id: item.id, chosen: state.chosen, strength: state.strength, unsafe: state.unsafe.slice()};
    }
    var order = currentOrder();
    var ranks = item.responses.map(function (_, i) { return order.indexOf(i); });
    return {item_id: item.id, ranks: ranks, ratings: state.ratings.slice(),
            flags: state.flags.map(function (f) { return f.slice(); })};
  }

  async function submit() {
    if (sending || !item || missing()) return;
    var body = labelBody();
    body.client_id = newClientId();  // one per submission; every retry of it sends the same one
    sending = true;
    document.body.classList.add("sending");
    updateSubmit();
    setStatus("Saving…", "info");
    try {
      var r = await api("POST", "/api/labels", body);
      if (!r.ok) {
        setStatus("Not saved: " + ((r.data && r.data.error) || "the server answered " + r.status), "error");
        return;
      }
      setProgress(r.data.progress);
      await loadNext();  // still "sending" until the next item is shown: no second submission of this one
      setStatus("Saved.", "ok", 1500);
    } catch (err) {
      handleError(err);
    } finally {
      sending = false;
      document.body.classList.remove("sending");
      updateSubmit();
    }
  }

  // ---------------------------------------------------------------- keys and wiring
  document.addEventListener("keydown", function (ev) {
    if ($("item-view").hidden || !item || ev.ctrlKey || ev.metaKey) return;
    var t = ev.target;
    var typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && /^(text|password|search|number)$/.test(t.type)));
    if (typing) return;
    if (ev.key === "Enter" && !ev.altKey && !ev.shiftKey) {
      if (t && t.classList && t.classList.contains("move")) return;  // Enter on ↑/↓ moves
      ev.preventDefault();
      submit();
      return;
    }
    if (item.kind === "pair" && !ev.altKey && (ev.key === "1" || ev.key === "2")) {
      ev.preventDefault();
      choosePair(Number(ev.key) - 1);
    }
  });

  document.querySelectorAll(".strength").forEach(function (b) {
    b.addEventListener("click", function () { chooseStrength(b.getAttribute("data-strength")); });
  });
  $("submit").addEventListener("click", submit);
  $("token-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var t = $("token-input").value.trim();
    if (!t) return;
    token = t;
    try { localStorage.setItem(TOKEN_KEY, t); } catch (e) { /* private mode */ }
    show("token-error", false);
    start();
  });
  $("sign-out").addEventListener("click", function () { askToken(""); });
  $("check-again").addEventListener("click", function () { loadNext().catch(handleError); });

  window.rlhfLabel = {renderMarkdown: renderMarkdown, escapeHtml: escapeHtml, strengths: STRENGTHS};

  token = initialToken();
  if (token) start(); else askToken("");
})();
