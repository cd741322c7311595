"""PPOModule: RLHF with PPO against a reward model (Ziegler et al. 2019 arXiv 1909.08593, InstructGPT
arXiv 2203.02155): each batch of prompts is one rollout, then `ppo_epochs` passes of clipped updates.

Per batch: (1) sample responses (KV cache, seeded generator); (2) no grad: behaviour and reference
log-probs, values, RewardSpec scores of the decoded text; (3) rewards = -kl_coef * KL per token with the
score on the last real response token, GAE, whitened advantages (core/losses/ppo.py); (4) ppo_epochs x
num_minibatches optimizer steps, each over grad_accum micro-batches, with gradient clipping.
Layouts: "separate" = policy (full or LoRA) + frozen reference copy + value model (scalar head, read per
token); "shared" = ONE base: the policy is a LoRA adapter, the reference the adapter switched off, the value
a linear head on the policy's last hidden state (an 8-bit base works: quantization int8 + LoRA).
Critic-free advantages (`advantage` grpo, rloo, reinforce_pp; core/losses/critic_free.py) replace step (3)'s GAE
and load no value model or value head: GRPO normalises each prompt's group of sampled scores and puts the KL in
the loss, RLOO subtracts the other samples' mean reward, REINFORCE++ whitens discounted KL-shaped returns.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.aggregation import MeanMetric

from core.batches import PackedResponses
from core.forward import response_logits, response_values
from core.generation import SamplingSpec, decode_responses, generate
from core.losses import critic_free as cf
from core.losses import ppo as losses
from core.losses.kl_control import AdaptiveKLController, FixedKLController
from core.losses.normalise import RunningMoments
from core.models import (
    ModelSpec,
    as_spec,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from core.ops import entropy_from_logits, masked_sum, token_logprobs
from core.optim import OPTIM_ARGS, OptimSpec, adamw
from core.packing import pack_sequences
from core.reward_spec import RewardSpec, as_reward_spec
from modules.export import EXPORT_ARGS, HFExport
from modules.overoptimisation import JUDGE_ARGS, BestWeights, OveroptimisationMonitor
from modules.predict import response_writer, sample_rows
from modules.rollout import Experience, micro_batch_weights, minibatches, repeat_each
from modules.stage import StageHooks, root_device, shared_args


@shared_args(JUDGE_ARGS, OPTIM_ARGS, EXPORT_ARGS)
class PPOModule(StageHooks, LightningModule):
    """PPO from prompts: the policy samples, a RewardSpec scores, a KL penalty keeps it near the reference.

    Under manual optimisation `trainer.max_steps` and `global_step` count OPTIMIZER steps: one batch of
    prompts makes ppo_epochs * num_minibatches of them (use multiples for checkpoint.every_n_train_steps).
    The optimizer takes all trainable parameters, the policy's and the value model's; fit exports the policy.
    The critic-free advantages (grpo, rloo, reinforce_pp) load no value model and no value head, have no value
    loss and log no value metrics; gamma, lam, vf_coef and value_clip_eps are for gae only (gamma also discounts
    reinforce_pp's returns).

    Args:
        policy: the model to train (full weights, or LoRA; layout "shared" needs LoRA).
        reward: what scores decoded responses: frozen reward model(s), reward functions or the oracle.
        sampling: rollout sampling; log-probs divide the logits by the same temperature and use the full
            softmax, so keep top_k 0 and top_p 1.0 (truncated sampling would be off-policy).
        layout: "separate" (reference copy, value model) or "shared" (one base: adapter, adapter off, value head).
        value_model: layout "separate": value model with a scalar head read at every response token; it must
            share the policy's tokenizer. Default: the reward's first model, else the policy. advantage gae only.
        advantage: "gae" (PPO with a value model: KL penalty in the token rewards, GAE); critic-free, no value
            model: "grpo" (Shao et al. 2024, arXiv 2402.03300: every token of response i gets
            (score_i - mean of its prompt's group) / (std of the group + 1e-4); the KL to the reference is a loss
            term, kl_coef x the k3 estimator per token, not a reward penalty), "rloo" (Ahmadian et al. 2024,
            arXiv 2402.14740: R_i = score_i - kl_coef x the response's summed KL (kl_kind), advantage R_i - the
            mean R of the other samples of its prompt, on every token), "reinforce_pp" (Hu 2025, arXiv
            2501.03262: the KL-penalised token rewards of gae, returns discounted by gamma, whitened over all
            response tokens of the batch (per rank)). grpo and rloo need sampling.num_samples >= 2: the group
            is a prompt's num_samples responses.
        group_std: grpo: divide by the group's std; False is Dr. GRPO (Liu et al. 2025, arXiv 2503.20783), which
            drops it (the std up-weights prompts the policy nearly always or never gets right).
        loss_agg: critic-free options: "token_mean" averages the per-token loss (clipped surrogate + grpo's KL
            term - entropy bonus) over every response token of the minibatch (DAPO, Dr. GRPO; TRL's default
            "dapo"); "seq_mean" over each response's tokens, then over responses (the GRPO paper). Default
            token_mean: seq_mean gives a token of a short response more weight than one of a long response, so
            long wrong answers are penalised less per token and responses drift longer (the paper's length bias).
            Means are per rank (DDP averages the ranks' gradients, as for gae); gae keeps its token mean.
        kl_coef: KL penalty coefficient (the initial one if adaptive_kl); grpo: the KL loss term's coefficient.
        kl_kind: per-token KL estimator of the reward penalty and train/kl: k1 (logp - ref), k3, abs or mse
            (grpo's loss term is always k3: the k1 term's gradient is zero in expectation).
        adaptive_kl: steer the summed per-response KL to kl_target (Ziegler et al.), else fixed kl_coef.
        kl_target: adaptive KL target, nats per response.
        kl_horizon: adaptive KL horizon, in responses.
        gamma: discount of GAE and of reinforce_pp's returns.
        lam: GAE lambda.
        clip_eps: policy ratio clip range.
        value_clip_eps: value clip range around the rollout's values.
        vf_coef: value loss weight in loss = policy + vf_coef * value - entropy_coef * entropy.
        entropy_coef: entropy bonus weight.
        ppo_epochs: passes over each rollout.
        num_minibatches: optimizer steps per pass (the rollout is split into this many minibatches).
        grad_accum: micro-batches per minibatch, each backward separately (memory), one optimizer step.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        whiten_advantages: whiten advantages over the rollout's response tokens (gae and reinforce_pp; grpo and
            rloo are normalised within their groups).
        reward_norm: normalise scores by the running mean and std of every rollout's scores so far (this one
            included; pooled over DDP ranks), before the missing-EOS penalty and score_clip: the KL coefficient
            and the clip then mean the same for any reward model's scale. train/reward and val/reward stay raw.
        score_clip: clip scores to [-score_clip, score_clip] (after normalisation and the missing-EOS penalty).
        missing_eos_penalty: subtracted from the score of responses that hit max_new_tokens without EOS.
        seed: seed of the rollout/minibatch generator (+ rank); validation re-seeds with seed + 1 every time.
        packing: score and train on padding-free packed rows (rollout.pack_sequences) instead of left-padded ones.
        predict_file: where `predict` writes one json line per response of the policy to the DataModule's prompts
            {prompt, response, sample, finish_reason, tokens, index, meta}, as `rlhf generate` with `sampling` and
            --seed `seed` (default: <log dir>/predictions.jsonl).
    """

    stage = "ppo"

    def __init__(
        self,
        policy: ModelSpec,
        reward: RewardSpec,
        sampling: SamplingSpec = SamplingSpec(),  # never mutated: a shared default is safe
        layout: Literal["separate", "shared"] = "separate",
        value_model: ModelSpec | None = None,
        advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae",
        group_std: bool = True,
        loss_agg: Literal["token_mean", "seq_mean"] = "token_mean",
        kl_coef: float = 0.05,
        kl_kind: Literal["k1", "k3", "abs", "mse"] = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        grad_accum: int = 1,
        max_grad_norm: float | None = 1.0,
        whiten_advantages: bool = True,
        reward_norm: bool = False,
        score_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        optimizer: OptimizerCallable = adamw,
        scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        decay: Literal["constant", "linear", "cosine"] = "constant",
        seed: int = 0,
        save_dir: str | None = None,
        merge_lora: bool = True,
        overwrite: bool = False,
        packing: bool = True,
        predict_file: str | None = None,
        val_reward: RewardSpec | None = None,
        overopt_patience: int = 3,
        export_best: str | None = None,
        export_best_mode: Literal["max", "min"] = "max",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.automatic_optimization = False
        self.policy_spec = as_spec(policy)
        self.reward = dataclasses.replace(as_reward_spec(reward))  # own copy: loaded models stay out of hparams
        self.sampling = sampling if isinstance(sampling, SamplingSpec) else SamplingSpec(**dict(sampling))
        self.temperature = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
        if layout == "shared" and self.policy_spec.lora is None:
            raise ValueError("layout='shared' trains the policy as a LoRA adapter on the shared base: set policy.lora")
        self.layout = layout
        if advantage not in ("gae", "grpo", "rloo", "reinforce_pp"):
            raise ValueError(f"advantage={advantage!r}: expected gae, grpo, rloo or reinforce_pp")
        if advantage in ("grpo", "rloo") and self.sampling.num_samples < 2:
            raise ValueError(f"advantage={advantage!r} compares the responses to one prompt: set "
                             f"sampling.num_samples >= 2 (the group size), not {self.sampling.num_samples}")
        if advantage != "gae" and value_model is not None:
            raise ValueError(f"value_model is the critic of advantage 'gae'; advantage={advantage!r} trains without "
                             "one: drop value_model")
        if loss_agg not in ("token_mean", "seq_mean"):
            raise ValueError(f"loss_agg={loss_agg!r}: expected token_mean or seq_mean")
        self.advantage, self.critic = advantage, advantage == "gae"
        self.group_std, self.loss_agg = group_std, loss_agg
        default_value = self.reward.models[0] if self.reward.models else self.policy_spec
        self.value_spec = as_spec(value_model) if value_model is not None else default_value
        self.kl_kind, self.adaptive_kl = kl_kind, adaptive_kl
        self.kl_ctl = (AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl
                       else FixedKLController(kl_coef))
        self.gamma, self.lam, self.clip_eps, self.value_clip_eps = gamma, lam, clip_eps, value_clip_eps
        self.vf_coef, self.entropy_coef = vf_coef, entropy_coef
        self.ppo_epochs, self.num_minibatches, self.grad_accum = ppo_epochs, num_minibatches, grad_accum
        self.max_grad_norm, self.whiten, self.score_clip = max_grad_norm, whiten_advantages, score_clip
        self.missing_eos_penalty = missing_eos_penalty
        self.reward_moments = RunningMoments() if reward_norm else None
        self.optim = OptimSpec(optimizer, scheduler, warmup_steps, decay)
        self.seed, self.packing, self.predict_file = seed, packing, predict_file
        self.policy = self.reference = self.value_model = self.value_head = self.tokenizer = None
        self.generator: torch.Generator | None = None  # rollouts and minibatch order; saved in checkpoints
        self.val_generator: torch.Generator | None = None
        self._pending_state: dict | None = None  # generator state loaded before the generator exists
        val_names = ("reward", "kl") + (("value_loss",) if self.critic else ()) + ("response_length",)
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in val_names})
        # held-out judge (modules/overoptimisation.py, StageHooks.judged_metrics): own copy, as self.reward
        self.judge = dataclasses.replace(as_reward_spec(val_reward)) if val_reward is not None else None
        if self.judge is not None:
            self.val_metrics["judge_reward"] = MeanMetric()
        self.judge_monitor = OveroptimisationMonitor(overopt_patience)
        logged = [f"val/{k}" for k in self.val_metrics] + (["val/reward_gap"] if self.judge is not None else [])
        self.best_weights = BestWeights(export_best, export_best_mode, logged) if export_best else None
        self.export = HFExport(self.stage, save_dir, merge_lora, overwrite, best=self.best_weights)
        self.strict_loading = False  # checkpoints hold trainable weights only

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        device = root_device(self, self.device)
        self.tokenizer = load_tokenizer(self.policy_spec, padding_side="left")
        self.policy = load_causal_lm(self.policy_spec, device=device)
        if self.layout == "shared" and self.critic:  # value head on the last hidden state; zero init: V = 0 at first
            self.value_head = torch.nn.Linear(self.policy.config.hidden_size, 1, device=device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        elif self.layout == "separate":
            ref_spec = dataclasses.replace(self.policy_spec, lora=None, gradient_checkpointing=False)
            self.reference = load_causal_lm(ref_spec, device=device, trainable=False)
            if self.critic:
                self.value_model = load_sequence_classifier(self.value_spec, self.tokenizer.pad_token_id, device=device)
        self.reward.load(device)
        if self.judge is not None:
            self.judge.load(device)
        self.generator = torch.Generator(device).manual_seed(self.seed + self.global_rank)  # ranks sample apart
        if self._pending_state is not None:
            self._restore_state(self._pending_state)

    # ----- forward passes over prompt + response rows (b, p + r); packed: their pack_sequences layout -----

    def pack(self, sequences, attention_mask, p: int) -> PackedResponses | None:
        return pack_sequences(sequences, attention_mask, p) if self.packing else None

    def policy_forward(
        self, sequences, attention_mask, p: int, values: bool = True, packed: PackedResponses | None = None
    ):
        """Response-token log-probs (b, r), values (b, r) or None, and temperature-scaled logits (b, r, v)."""
        packed = self.pack(sequences, attention_mask, p) if packed is None else packed
        shared_values = values and self.layout == "shared"
        logits, hidden = response_logits(self.policy, sequences, attention_mask, p, packed, hidden=shared_values)
        logits = logits / self.temperature  # (b, r, v): the positions that predict the response
        logp = token_logprobs(logits, sequences[:, p:])  # (b, r)
        if not values:
            return logp, None, logits
        if shared_values:
            v = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        else:
            v = response_values(self.value_model, sequences, attention_mask, p, packed)  # layout separate
        return logp, v.float(), logits

    def reference_logp(
        self, sequences, attention_mask, p: int, packed: PackedResponses | None = None
    ) -> torch.Tensor:
        packed = self.pack(sequences, attention_mask, p) if packed is None else packed
        if self.layout == "shared":
            with self.policy.disable_adapter():  # the base without the adapter is the initial policy
                return self.policy_forward(sequences, attention_mask, p, values=False, packed=packed)[0]
        logits = response_logits(self.reference, sequences, attention_mask, p, packed)[0]
        return token_logprobs(logits, sequences[:, p:], self.temperature)  # (b, r)

    def _no_dropout(self) -> None:
        # behaviour and training forwards must agree (ratio 1 on the first pass), and dropout would draw from
        # the global RNG, which a resumed run does not replay
        for m in (self.policy, self.reference, self.value_model, self.value_head):
            if m is not None:
                m.eval()

    # ----- rollout -----

    @property
    def micro_batches_weigh_tokens(self) -> bool:
        """A micro-batch's loss weighs its share of the minibatch's response tokens where the loss is a token mean
        (gae, token_mean), of its rows for seq_mean: the micro-batches then add up to the minibatch's loss, whatever
        grad_accum splits it into."""
        return self.critic or self.loss_agg == "token_mean"

    @torch.no_grad()
    def rollout(self, batch: dict, generator: torch.Generator, kl_coef: float, chunk: int,
                update_norm: bool = False) -> tuple[Experience, dict]:
        """Sample, score and evaluate one batch of prompts: Experience plus per-row stats (b,) for logging, and
        under "texts" the decoded responses (b) the reward scored.
        update_norm: add this rollout's scores to the running reward moments (training rollouts only)."""
        self._no_dropout()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        with self.sampling_guard():
            out = generate(self.policy, batch["input_ids"], batch["attention_mask"], self.sampling, eos, pad,
                           generator, self.tokenizer)
        n, p, mask = self.sampling.num_samples, out.prompt_length, out.response_mask.bool()
        texts = decode_responses(self.tokenizer, out, eos)
        meta = repeat_each(batch.get("meta") or [{}] * len(batch["prompts"]), n)
        scores = self.reward.score(repeat_each(batch["prompts"], n), texts, meta, device=mask.device).float()  # (b,)
        logp, ref_logp, values, entropy = [], [], [], []
        for rows in torch.arange(len(texts), device=mask.device).split(chunk):
            seq, am = out.sequences[rows], out.attention_mask[rows]
            packed = self.pack(seq, am, p)  # one layout for the policy, value and reference forwards
            lp, v, logits = self.policy_forward(seq, am, p, values=self.critic, packed=packed)
            logp.append(lp)
            values.append(v)
            entropy.append(masked_sum(entropy_from_logits(logits), mask[rows], dim=-1))  # (chunk,)
            ref_logp.append(self.reference_logp(seq, am, p, packed))
        logp, ref_logp = torch.cat(logp), torch.cat(ref_logp)
        values = torch.cat(values) if self.critic else None
        shaped = losses.shape_scores(self.normalise_scores(scores, update_norm), out.has_eos, self.missing_eos_penalty,
                                     self.score_clip)
        # rewards (b, r): the score on the last token
        rewards, kl = losses.token_rewards(shaped, logp, ref_logp, mask, kl_coef, self.kl_kind)
        advantages, returns = self.advantages(shaped, rewards, values, mask)
        exp = Experience(out.sequences, out.attention_mask, mask, logp, ref_logp, values, advantages, returns, p)
        stats = {"scores": scores, "kl": kl.sum(-1), "entropy": torch.cat(entropy), "rlhf_reward": rewards.sum(-1),
                 "response_length": mask.sum(-1).float(), "texts": texts}
        return exp, stats

    def advantages(self, scores, rewards, values, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advantages (b, r) and returns (b, r) (None for grpo and rloo) of one rollout, by `advantage`.
        scores (b,) shaped; rewards (b, r) the KL-penalised token rewards (score on the last token)."""
        n = self.sampling.num_samples
        if self.advantage == "gae":
            advantages, returns = losses.gae(rewards, values, mask, self.gamma, self.lam)
            return (losses.whiten_advantages(advantages, mask) if self.whiten else advantages), returns
        if self.advantage == "reinforce_pp":
            return cf.reinforce_pp_advantages(rewards, mask, self.gamma, self.whiten)
        if self.advantage == "grpo":  # KL goes in the loss: the group compares the scores alone
            return cf.per_token(cf.grpo_advantages(scores, n, self.group_std), mask), None
        return cf.per_token(cf.rloo_advantages(rewards.sum(-1), n), mask), None  # rloo: score - kl_coef * KL

    def normalise_scores(self, scores: torch.Tensor, update: bool) -> torch.Tensor:
        """reward_norm: (b,) scores -> (scores - running mean) / running std, the moments first updated with
        this batch if `update` (count, sum and sum of squares summed over ranks: every rank keeps the same)."""
        if self.reward_moments is None:
            return scores
        if update:
            pooled = torch.stack([scores.new_tensor(float(len(scores))), scores.sum(), scores.square().sum()]).double()
            if self._trainer is not None and self.trainer.world_size > 1:
                pooled = self.trainer.strategy.reduce(pooled, reduce_op="sum")
            self.reward_moments.update(*pooled.tolist())
        return self.reward_moments.normalise(scores)

    # ----- training -----

    def training_step(self, batch: dict, batch_idx: int) -> None:
        b = len(batch["prompts"]) * self.sampling.num_samples
        chunk = -(-b // (self.num_minibatches * self.grad_accum))  # rows per micro-batch
        kl_coef = self.kl_ctl.value
        exp, stats = self.rollout(batch, self.generator, kl_coef, chunk, update_norm=True)
        # Ziegler et al.: after each rollout, from the mean KL over all ranks' responses, so every rank keeps one value
        kl = self.global_mean(stats["kl"].sum(), stats["kl"].new_tensor(b))[1]
        self.kl_ctl.update(kl.item(), n_steps=b * self.trainer.world_size)
        opt, sched = self.optimizers(), self.lr_schedulers()
        logs: dict[str, list] = {}
        for _ in range(self.ppo_epochs):
            for micro in minibatches(b, self.num_minibatches, self.grad_accum, self.generator, exp.mask.device):
                weights = micro_batch_weights(exp.mask, micro, by_tokens=self.micro_batches_weigh_tokens)
                for idx, weight in zip(micro, weights):
                    out = self.ppo_losses(exp, idx, kl_coef)
                    self.manual_backward(out.loss * weight)
                    for k, v in zip(out._fields, out):
                        logs.setdefault(k, []).append(v.detach())
                if self.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()
        mean = {k: torch.stack(v).mean() for k, v in logs.items()}
        # rollout (per response): reward, kl, entropy, rlhf_reward; minibatch losses: the rest
        metrics = {"train/reward": stats["scores"].mean()}
        metrics |= {f"train/{k}": stats[k].mean() for k in ("kl", "entropy", "rlhf_reward")}
        metrics |= {"train/policy_clipfrac": mean["clipfrac"], "train/approxkl": mean["approxkl"],
                    "train/loss": mean["loss"], "train/policy_loss": mean["policy_loss"],
                    "train/token_entropy": mean["entropy"], "train/kl_coef": torch.tensor(kl_coef),
                    "train/response_length": stats["response_length"].mean()}
        if self.critic:
            metrics |= {"train/value_loss": mean["value_loss"], "train/value_clipfrac": mean["value_clipfrac"]}
        elif self.advantage == "grpo":
            metrics["train/kl_loss"] = mean["kl_loss"]
        self.log_dict(metrics, batch_size=b)

    def ppo_losses(self, exp: Experience, idx: torch.Tensor, kl_coef: float = 0.0):
        """The loss of rows idx under the current policy and value: ppo.ppo_loss's output (gae), else
        critic_free.critic_free_loss's (kl_coef: grpo's KL loss term)."""
        self._no_dropout()
        logp, values, logits = self.policy_forward(exp.sequences[idx], exp.attention_mask[idx], exp.prompt_length,
                                                   values=self.critic)
        mask = exp.mask[idx]
        if not self.critic:
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.entropy_coef)):  # else logged only
                entropy = entropy_from_logits(logits)  # (b, r)
            ref_logp = exp.ref_logp[idx] if self.advantage == "grpo" else None
            return cf.critic_free_loss(logp, exp.old_logp[idx], exp.advantages[idx], mask, entropy, ref_logp, kl_coef,
                                       self.clip_eps, self.entropy_coef, self.loss_agg)
        if self.entropy_coef:
            entropy = losses.entropy_bonus(logits, mask)
        else:
            with torch.no_grad():  # logged only
                entropy = losses.entropy_bonus(logits, mask)
        return losses.ppo_loss(logp, exp.old_logp[idx], exp.advantages[idx], values, exp.old_values[idx],
                               exp.returns[idx], mask, entropy, self.clip_eps, self.value_clip_eps, self.vf_coef,
                               self.entropy_coef)

    # ----- validation: one sampled response per prompt, same seed every time -----

    def on_validation_epoch_start(self) -> None:
        self.val_generator = torch.Generator(root_device(self, self.device)).manual_seed(self.seed + 1)

    # `test` evaluates the DataModule's validation file, reported under test/
    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        b = len(batch["prompts"]) * self.sampling.num_samples
        exp, stats = self.rollout(batch, self.val_generator, self.kl_ctl.value, chunk=b)
        for key, value in (("reward", stats["scores"]), ("kl", stats["kl"]),
                           ("response_length", stats["response_length"])):
            self.val_metrics[key].update(value)
        if self.critic:
            vl = losses.value_loss(exp.old_values, exp.old_values, exp.returns, exp.mask, self.value_clip_eps).loss
            self.val_metrics["value_loss"].update(vl, weight=b)
        if self.judge is not None:  # the held-out judge scores the same decoded responses
            n = self.sampling.num_samples
            meta = repeat_each(batch.get("meta") or [{}] * len(batch["prompts"]), n)
            judged = self.judge.score(repeat_each(batch["prompts"], n), stats["texts"], meta, device=exp.mask.device)
            self.val_metrics["judge_reward"].update(judged.float())

    def on_validation_epoch_end(self) -> None:
        self.log_judged("test" if self.trainer.testing else "val", dict(self.val_metrics))

    # ----- predict: the policy's responses to the DataModule's prompts, as `rlhf generate` writes them -----

    def configure_callbacks(self):
        return [self.export, *response_writer(self)]

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        return sample_rows(self, batch, self.sampling, self.seed, batch_idx)

    # ----- optimizer, checkpoints -----

    def configure_optimizers(self):
        return self.optim.configure(self.parameters(), self.optimizer_steps())

    def optimizer_steps(self) -> int:
        """Optimizer steps the LR schedule spans."""
        steps = self.trainer.estimated_stepping_batches
        if self.trainer.max_steps == -1:  # counted in batches of prompts, each several optimizer steps
            steps *= self.ppo_epochs * self.num_minibatches
        return steps

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_state"] = {"kl_ctl": self.kl_ctl.state_dict(), "generator": self.generator.get_state()}
        if self.reward_moments is not None:
            checkpoint["ppo_state"]["reward_moments"] = self.reward_moments.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # held-out judge state
        state = checkpoint.get("ppo_state")
        if state is not None:
            if self.generator is None:
                self._pending_state = state
            else:
                self._restore_state(state)

    def _restore_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.reward_moments is not None and "reward_moments" in state:
            self.reward_moments.load_state_dict(state["reward_moments"])
        self.generator.set_state(state["generator"].cpu())
        self._pending_state = None
