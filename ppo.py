"""PPO for RLHF: actor-critic with GAE, and a KL penalty to the reference folded into the reward (InstructGPT).

The policy (actor) samples a completion; a reward model or verifier scores it; every token pays -beta * KL to the
frozen starting model, and the score lands on the last token. A critic V_phi(s_t) estimates the return from each
state, GAE turns TD errors into advantages, and PPO's clipped surrogate keeps each update near pi_old:

    r~_t     = -beta (log pi_old(o_t) - log pi_ref(o_t))  (+ score on the last token)            [RLHF-KL-REWARD]
    delta_t  = r~_t + gamma V_old(s_t+1) - V_old(s_t),   V(s_T) = 0 after the last token             [TD-ERROR]
    A_t      = sum_l (gamma lam)^l delta_t+l   (backwards: A_t = delta_t + gamma lam A_t+1)            [GAE]
               an estimate of Q(s_t, o_t) - V(s_t): lam = 1 gives G_t - V(s_t), lam = 0 the TD error        [ADV]
    R_hat_t  = A_t + V_old(s_t)                                                                        [RETURNS]
    L_clip   = E_t[ min(r_t A_t, clip(r_t, 1-eps, 1+eps) A_t) ],  r_t = pi_theta / pi_old     [IS-RATIO] [PPO-CLIP]
    L_V      = E_t[ 0.5 (V_phi(s_t) - R_hat_t)^2 ]  (optionally clipped around V_old; the 0.5 halves c1)   [PPO-VALUE]
    L        = -L_clip + c1 L_V - c2 S[pi_theta](s_t)                                    [PPO-TOTAL] [PPO-ENTROPY]

This maximises E[score] - beta KL(pi_theta || pi_ref) [RLHF-OBJ]; --target-kl adapts beta towards a KL budget
[KL-ADAPTIVE]. The critic is a linear head on the last hidden state of a separate copy of the starting model (the
four models, actor, critic, reference and reward, of the blog post "rl与post-train"), or of the policy's own backbone
(--shared-backbone); the head starts at zero, so early values are 0. With --lora-rank the actor trains LoRA adapters
and pi_ref is the actor with them switched off; the critic, on its own copy, still trains every weight.

PPO's other variant, --policy-loss penalty, has no clip: a KL penalty to pi_old takes its place in L, with a weight
beta_pen adapted after each rollout's updates, from the KL they made, towards a target d_targ (--penalty-kl-target):

    L_pen    = -E_t[ r_t A_t - beta_pen KL_t ],  KL_t = r_t - 1 - log r_t  (k3 of KL(pi_old || pi_theta))  [PPO-PENALTY]
    beta_pen <- 2 beta_pen if KL > 1.5 d_targ,  beta_pen / 2 if KL < d_targ / 1.5,  else unchanged

Every tag in brackets is defined, with its derivation and papers, in docs/equations.md.

Usage: python ppo.py --model HuggingFaceTB/SmolLM2-135M-Instruct
       python ppo.py --reward-model runs/reward-xyz/final       # a model trained by reward.py, instead of the verifier
       torchrun --nproc-per-node 8 ppo.py --fsdp ...   # several GPUs: the same math (README)
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from statistics import fmean
from typing import Literal

import torch

from common import (all_reduce, autocast, completion_logprobs, decode, encode_prompts, evaluate, forward_pass, gather,
                    generate, is_correct, masked_mean, parse_number, share, world_size)
from plumbing import (SamplingArgs, Steps, all_reduce_gradients, at_least, between, check_args, check_finite,
                      clip_grad_norm, describe_run, distribute, exit_on_error, fit_to_batch, full_state_dict,
                      load_model, load_policy, load_reward_model, log_metrics, log_samples, make_optimizer,
                      optimizer_state, parse_args, positive, prepare_output_dir, prompt_length_check,
                      read_trainer_state, reference_model, require, resume_state, save_pretrained, start_run, task_data,
                      unused)


@dataclass
class Args(SamplingArgs):
    reward_model: str | None = None
    """a sequence-classification reward model (reward.py's final/) scoring prompt+completion; None: the verifier"""
    shared_backbone: bool = False
    """critic head on the policy's own backbone instead of a separate copy of the starting model (not with
    --lora-rank)"""
    ppo_epochs: int = 2
    """passes over each rollout"""
    mini_batch_size: int = 32
    """completions per optimiser step"""
    policy_loss: Literal["clip", "penalty"] = "clip"
    """clip: the clipped surrogate [PPO-CLIP]; penalty: the surrogate minus beta_pen KL(pi_old || pi_theta), beta_pen
    adapted after every rollout [PPO-PENALTY]"""
    clip_eps: float = 0.2
    """policy ratio clipped to [1 - clip_eps, 1 + clip_eps] (--policy-loss clip)"""
    penalty_kl_target: float = 0.01
    """--policy-loss penalty: d_targ, the KL(pi_old || pi_theta) per token that a rollout's updates aim at; beta_pen
    doubles when the KL measured after them is above 1.5 d_targ, halves below d_targ / 1.5"""
    penalty_beta: float = 1.0
    """--policy-loss penalty: the initial beta_pen, weight of KL(pi_old || pi_theta) in the loss"""
    clip_value: float | None = 0.2
    """value clipped to V_old +- clip_value in the value loss; None: unclipped"""
    vf_coef: float = 0.1
    """c1: weight of the value loss"""
    entropy_coef: float = 0.0
    """c2: weight of the entropy bonus"""
    beta: float = 0.05
    """KL penalty per token in the reward (the initial value, if --target-kl adapts it)"""
    target_kl: float | None = None
    """adapt beta so the KL per completion approaches this (nats); None keeps beta fixed"""
    kl_horizon: int = 10_000
    """samples over which the adaptive controller corrects a KL error"""
    early_stop_kl: float | None = None
    """stop a rollout's updates after the first mini-batch whose approximate KL(pi_old || pi_theta) (k3, measured in
    its forward pass) exceeds this"""
    gamma: float = 1.0
    """discount factor of the returns"""
    lam: float = 0.95
    """GAE lambda: 0 is the TD(0) advantage, 1 the Monte-Carlo return minus the value"""
    missing_eos_penalty: float = 0.0
    """subtracted from the score of a completion that hits max_new_tokens without EOS"""
    format_reward: float = 0.0
    """added to the verifier's reward when the completion is nothing but a number"""

    batch_size: int = 64
    """prompts per rollout, one completion each"""


def check_flags(args: Args) -> None:
    """PPO's flags: their ranges, and the combinations it refuses."""
    check_args(args, ppo_epochs=at_least(1), mini_batch_size=at_least(1), clip_eps=positive, clip_value=positive,
               vf_coef=at_least(0), entropy_coef=at_least(0), beta=at_least(0), target_kl=positive,
               kl_horizon=at_least(1), early_stop_kl=positive, gamma=between(0, 1), lam=between(0, 1),
               penalty_kl_target=positive, penalty_beta=positive)
    unused(args, "penalty_kl_target penalty_beta", args.policy_loss == "penalty", "with --policy-loss clip")
    unused(args, "clip_eps", args.policy_loss == "clip", "with --policy-loss penalty (it does not clip)")
    fit_to_batch(args, "mini_batch_size", args.batch_size)
    fit_to_batch(args, "micro_batch_size", args.mini_batch_size)
    require(args.batch_size % args.mini_batch_size == 0 and args.mini_batch_size % args.micro_batch_size == 0,
            f"--batch-size ({args.batch_size}) must be a multiple of --mini-batch-size ({args.mini_batch_size}), "
            f"which must be a multiple of --micro-batch-size ({args.micro_batch_size})")
    require(not (args.fsdp and args.shared_backbone), "--fsdp with --shared-backbone: the critic would call the "
            "actor's backbone outside the actor's FSDP root; leave out one of them")
    require(not (args.lora_rank and args.shared_backbone), "--shared-backbone with --lora-rank: the critic would "
            "read the actor's frozen backbone and could learn only through the actor's adapters; leave out one of them")
    unused(args, "kl_horizon", args.target_kl is not None, "without --target-kl (beta stays fixed)")
    unused(args, "format_reward", not args.reward_model, "with --reward-model (it scores instead of the verifier)")


# ---- the math: one function per equation --------------------------------------------------------------------------

def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, beta: float = 0.0):
    """[RLHF-KL-REWARD] Per-token rewards (B, T): -beta * kl on every token (kl = log pi_old - log pi_ref, the k1
    estimate; no penalty if kl is None), plus the sequence's score on its last real token (its EOS, found from the
    mask's length, never from pad ids: pad == EOS for SmolLM2)."""
    rewards = torch.zeros(mask.shape, dtype=torch.float, device=mask.device)
    if kl is not None:
        rewards = rewards - beta * kl
    last = (mask.sum(1) - 1).clamp(min=0)
    rewards[torch.arange(len(mask)), last] += scores.to(rewards)
    return rewards * mask


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[TD-ERROR] delta_t = r_t + gamma V(s_t+1) - V(s_t), V = 0 past the last token; [GAE] A_t = delta_t +
    gamma lam A_t+1 computed backwards; [RETURNS] R_hat_t = A_t + V(s_t). All (B, T), zero where mask is 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(len(rewards), device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whiten(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(A - mean) / std over every valid token of the batch (not per group), 0 on padding; over the valid tokens of
    the whole batch: under torchrun the sums are all-reduced over ranks (then, as masked_mean, in A's dtype)."""
    n = advantages.new_tensor(all_reduce(mask.sum())).clamp(min=1)
    mean = advantages.new_tensor(all_reduce((advantages * mask).sum())) / n
    var = advantages.new_tensor(all_reduce(((advantages - mean) ** 2 * mask).sum())) / n
    return (advantages - mean) / (var.sqrt() + eps) * mask


def policy_loss(logprobs, old_logprobs, advantages, clip_eps: float):
    """[IS-RATIO] r_t = exp(log pi_theta - log pi_old); [PPO-CLIP] per token -min(r A, clip(r, 1-eps, 1+eps) A)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages), ratio


def penalty_policy_loss(logprobs, old_logprobs, advantages, beta_pen: float):
    """[IS-RATIO] r_t = exp(log pi_theta - log pi_old); [PPO-PENALTY] per token -(r A - beta_pen KL_t), KL_t the k3
    estimate of KL(pi_old || pi_theta) on the token sampled from pi_old: r - 1 - log r. Both k1 = -log r and k3 have
    the KL as their mean under pi_old, and so has their gradient (pi_old, not pi_theta, drew the tokens); k3 is also
    >= 0 on every token, and its gradient (r - 1) grad log pi_theta is exactly 0 at pi_theta = pi_old, where k1's,
    -grad log pi_theta, is noise of mean 0 that beta_pen would weigh against the advantage's signal."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    return -(ratio * advantages - beta_pen * (torch.expm1(log_ratio) - log_ratio)), ratio


def adapt_penalty_beta(beta_pen: float, kl: float, kl_target: float) -> float:
    """[PPO-PENALTY] (the PPO paper's rule, between rollouts): beta_pen doubles when the measured KL(pi_old ||
    pi_theta) is above 1.5 d_targ, halves when it is below d_targ / 1.5, and stays as it is in between."""
    if kl > 1.5 * kl_target:
        return beta_pen * 2
    if kl < kl_target / 1.5:
        return beta_pen / 2
    return beta_pen


def value_loss(values, old_values, returns, clip_value: float | None):
    """[PPO-VALUE] per token 0.5 (V - R_hat)^2; with clipping, the max of that and the loss of V_old + clip(V - V_old),
    so the critic cannot move further than clip_value from V_old in one rollout. Also: where the clipped term won."""
    unclipped = (values - returns) ** 2
    if clip_value is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = (old_values + torch.clamp(values - old_values, -clip_value, clip_value) - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), clipped > unclipped


def adaptive_beta(beta: float, kl: float, target_kl: float, horizon: int, n_samples: int) -> float:
    """[KL-ADAPTIVE] (Ziegler et al.): beta <- beta (1 + e n / horizon), e = clip(KL / target - 1, -0.2, 0.2): raise
    beta when the KL is above target, lower it when below, by a relative step proportional to the n samples seen."""
    error = min(max(kl / target_kl - 1, -0.2), 0.2)
    return beta * (1 + error * n_samples / horizon)


def explained_variance(values, returns, mask) -> float | None:
    """1 - Var[R_hat - V] / Var[R_hat] over valid tokens: 1 is a perfect critic, 0 no better than a constant
    (None when the returns do not vary)."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask).item()  # noqa: E731
    return 1 - var(returns - values) / var(returns) if var(returns) > 0 else None


def reward(completion: str, correct: bool, format_reward: float = 0.0) -> float:
    """What is rewarded: 1 for a right answer (the verifier's verdict, `is_correct`), plus format_reward if the
    completion is nothing but one number, as the prompt asks."""
    bare_number = parse_number(completion) is not None and completion.strip().lstrip("-").replace(",", "").isdigit()
    return float(correct) + format_reward * bare_number


# ---- models: the critic and the reward model ------------------------------------------------------------------------

class Critic(torch.nn.Module):
    """V_phi(s_t) for every completion position: a linear head on a backbone's last hidden state, zero-initialised."""

    def __init__(self, backbone, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        hidden = forward_pass(self.backbone, prompt_ids, prompt_mask, completion_ids, completion_mask).last_hidden_state
        # V(s_t) is read where token t is predicted: at the position just before it.
        return self.head(hidden[:, prompt_ids.shape[1] - 1:-1]).squeeze(-1).float()  # (B, C)


def reward_model_scores(reward_model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """r(x, y): a sequence-classification model's scalar head on the hidden state of the completion's last real
    token (its EOS, found from the mask, not from pad ids), (B,)."""
    hidden = forward_pass(reward_model.base_model, prompt_ids, prompt_mask, completion_ids,
                          completion_mask).last_hidden_state
    last = prompt_ids.shape[1] + completion_mask.sum(1) - 1
    return reward_model.score(hidden[torch.arange(len(hidden)), last]).squeeze(-1).float()


# ---- training ------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    checkpoint, device, dtype = start_run(args, "ppo", check_flags,
                                          ("batch_size", "mini_batch_size", "micro_batch_size"))
    # actor pi_theta, critic V_phi, frozen pi_ref (LoRA: the actor with its adapters off), reward model if one is given
    model, tokenizer = load_policy(args, checkpoint, device)
    ref_model = load_model(args.model, device)[0].eval().requires_grad_(False) if not args.lora_rank else None
    backbone = model.base_model if args.shared_backbone else load_model(args.model, device)[0].base_model
    critic = Critic(backbone, model.config.hidden_size).to(device)
    reward_model = load_reward_model(args.reward_model, tokenizer, device) if args.reward_model else None
    problems, eval_set = task_data(args, prompt_length_check(tokenizer, args.max_prompt_length, args.truncate_prompts))
    output_dir = prepare_output_dir(args, checkpoint)  # the first write: every check has passed
    if args.gradient_checkpointing and not args.shared_backbone:  # the critic's own backbone (load_policy: the actor)
        backbone.gradient_checkpointing_enable()
    if checkpoint:
        critic.load_state_dict(read_trainer_state(checkpoint)["critic"])  # a whole state dict: before it is sharded
    model, critic, ref_model, reward_model = (distribute(m, args.fsdp, dtype) if m is not None else None
                                              for m in (model, critic, ref_model, reward_model))  # replicated or FSDP2
    trained = torch.nn.ModuleList([model, critic])  # what the optimiser updates; .parameters(): a shared one once
    optimizer, scheduler = make_optimizer(trained, args)  # one AdamW, one schedule for the actor and the critic
    start_step, state = resume_state(checkpoint, trained, optimizer, scheduler)
    beta, beta_pen = state.get("beta", args.beta), state.get("beta_pen", args.penalty_beta)  # as adapted so far
    describe_run("ppo", args, trained, device, dtype, f"{args.batch_size} prompts x 1 completion")  # with the critic
    problems = itertools.islice(problems, start_step * args.batch_size, None)  # the stream is the seed's

    run_eval = functools.partial(evaluate, model, tokenizer, eval_set, args.max_new_tokens,  # held-out, greedy
                                 args.generation_batch_size, device, dtype, args.max_prompt_length)
    progress = Steps(start_step, args.max_steps, "ppo", args.eval_every, args.save_every)  # Ctrl-C: save, stop
    clip = args.policy_loss == "clip"  # [PPO-CLIP]; else [PPO-PENALTY]
    metrics: dict = {}
    if eval_set and args.eval_every and start_step == 0:
        metrics = {"step": 0, "eval_accuracy": run_eval()}
        progress.write(log_metrics(output_dir, metrics, ("eval_accuracy",)))
    for step in progress:
        # ---- 1. rollout: sample from pi_old ------------------------------------------------------------------------
        t0 = time.time()
        batch = share([next(problems) for _ in range(args.batch_size)])  # this rank's prompts
        n_local = len(batch)
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [p["prompt"] for p in batch], device,
                                                 args.max_prompt_length)
        with autocast(device, dtype):
            completion_ids, mask, truncated = generate(model, tokenizer, prompt_ids, prompt_mask, args.max_new_tokens,
                                                       args.temperature, args.top_p,
                                                       batch_size=args.generation_batch_size)
        completions = decode(tokenizer, completion_ids, mask)
        sequences = (prompt_ids, prompt_mask, completion_ids, mask)  # (B, P) and (B, C)
        t_sample = time.time() - t0

        # ---- 2. score, and log pi_old, log pi_ref, V_old without grad -------------------------------------------
        micro_batches = torch.arange(n_local, device=device).split(args.micro_batch_size // world_size())
        with torch.no_grad(), autocast(device, dtype):
            old_logprobs = torch.cat([logprobs_of(model, sequences, mb, args.temperature)[0] for mb in micro_batches])
            with reference_model(model, ref_model) as ref:  # pi_ref (LoRA: the adapters off)
                ref_logprobs = torch.cat([logprobs_of(ref, sequences, mb, args.temperature)[0] for mb in micro_batches])
            old_values = torch.cat([critic(*(t[mb] for t in sequences)) for mb in micro_batches]) * mask
            if reward_model is not None:
                scores = torch.cat([reward_model_scores(reward_model, *(t[mb] for t in sequences))
                                    for mb in micro_batches])
        correct = torch.tensor([is_correct(c, p["answer"]) for c, p in zip(completions, batch)], dtype=torch.float)
        if reward_model is None:
            scores = torch.tensor([reward(c, bool(ok), args.format_reward) for c, ok in zip(completions, correct)])
        scores = scores.to(device) - args.missing_eos_penalty * truncated

        # ---- 3. per-token rewards [RLHF-KL-REWARD], advantages [TD-ERROR] [GAE], value targets [RETURNS] ----------
        kl = (old_logprobs - ref_logprobs) * mask  # log pi_old - log pi_ref on each sampled token
        rewards = token_rewards(scores, mask, kl, beta)
        advantages, returns = gae(rewards, old_values, mask, args.gamma, args.lam)
        advantages = whiten(advantages, mask)  # over the global batch's tokens

        # ---- 4. ppo_epochs passes, one optimiser step per mini-batch [PPO-TOTAL] ----------------------------------
        t1 = time.time()
        trained.train()
        surrogate = (functools.partial(policy_loss, clip_eps=args.clip_eps) if clip  # --policy-loss
                     else functools.partial(penalty_policy_loss, beta_pen=beta_pen))
        stats = {k: [] for k in ("loss", "policy_loss", "value_loss", "clip_frac", "value_clip_frac", "entropy",
                                 "approx_kl", "grad_norm")}
        mini_batches = (mini for _ in range(args.ppo_epochs)  # each pass: a fresh shuffle of this rank's rows
                        for mini in torch.randperm(n_local, device=device).split(args.mini_batch_size // world_size()))
        for mini in mini_batches:
            n_tok = max(all_reduce(mask[mini].sum()), 1)  # the mini-batch's tokens, over all ranks
            mini_stats = {k: 0.0 for k in ("loss", "policy_loss", "value_loss", "approx_kl")}
            for mb in mini.split(args.micro_batch_size // world_size()):  # this rank's share
                with autocast(device, dtype):
                    logprobs, entropy = logprobs_of(model, sequences, mb, args.temperature)
                    values = critic(*(t[mb] for t in sequences))
                pg, ratio = surrogate(logprobs, old_logprobs[mb], advantages[mb])  # [PPO-CLIP] or [PPO-PENALTY]
                vl, value_clipped = value_loss(values, old_values[mb], returns[mb], args.clip_value)  # [PPO-VALUE]
                # [PPO-TOTAL] -L_clip (or L_pen) + c1 L_V - c2 S, with the entropy S of pi_theta [PPO-ENTROPY]
                per_token = pg + args.vf_coef * vl - args.entropy_coef * entropy
                loss = (per_token * mask[mb]).sum() / n_tok  # token mean over the mini-batch: this rank's share
                loss.backward()
                log_ratio = (logprobs - old_logprobs[mb]).detach()
                for key, value in (("loss", per_token), ("policy_loss", pg), ("value_loss", vl),
                                   ("approx_kl", torch.expm1(log_ratio) - log_ratio)):  # k3 of pi_old||pi
                    mini_stats[key] += ((value.detach() * mask[mb]).sum() / n_tok).item()
                if clip:  # tokens whose ratio left [1 - eps, 1 + eps]: an upper bound of the clipped ones
                    stats["clip_frac"].append(masked_mean((ratio - 1).abs() > args.clip_eps, mask[mb]).item())
                stats["value_clip_frac"].append(masked_mean(value_clipped, mask[mb]).item())
                stats["entropy"].append(masked_mean(entropy.detach(), mask[mb]).item())
            all_reduce_gradients(model)  # the mini-batch's gradient: the sum of the ranks'
            all_reduce_gradients(critic.head if args.shared_backbone else critic)  # shared backbone: the actor's
            grad_norm = clip_grad_norm(trained, args.max_grad_norm)  # one norm over the actor and the critic
            mini_stats = {k: all_reduce(v) for k, v in mini_stats.items()}  # global: all ranks stop together
            check_finite(step + 1, loss=mini_stats["loss"], grad_norm=grad_norm)  # before the update, never after
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in {**mini_stats, "grad_norm": grad_norm}.items():
                stats[key].append(value)
            if args.early_stop_kl is not None and mini_stats["approx_kl"] > args.early_stop_kl:
                break  # --early-stop-kl: pi_theta has moved far enough from pi_old for this rollout
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        t_train = time.time() - t1
        kl_per_completion = gather(kl.sum(1)).mean().item()  # global: beta stays the same on every rank
        if args.target_kl is not None:  # [KL-ADAPTIVE]
            beta = adaptive_beta(beta, kl_per_completion, args.target_kl, args.kl_horizon, args.batch_size)
        if not clip:  # [PPO-PENALTY]: the KL that the updates made, then beta_pen for the next rollout
            stats["penalty_kl"] = [rollout_kl(model, sequences, old_logprobs, micro_batches, args.temperature, device,
                                              dtype)]
            beta_pen = adapt_penalty_beta(beta_pen, stats["penalty_kl"][0], args.penalty_kl_target)

        # ---- 5. log, evaluate, save ------------------------------------------------------------------------------
        samples = [{"prompt": p["prompt"], "completion": c, "answer": p["answer"], "reward": s}
                   for p, c, s in zip(batch[:4], completions, scores.tolist())]  # this rank's, before the gather
        metrics = metrics_row(step + 1, stats, scores, correct, kl, mask, old_values, returns, truncated, prompt_mask,
                              kl_per_completion, beta, beta_pen, lr, t0, t_sample, t_train, args.ppo_epochs)
        if eval_set and progress.eval_due(step + 1):
            metrics["eval_accuracy"] = run_eval()
        log_samples(output_dir, step + 1, samples, show="eval_accuracy" in metrics)
        progress.write(log_metrics(output_dir, metrics, ("reward_mean", "accuracy", "kl_k1", "value_loss",
                                                         "explained_variance", "completion_len", "eval_accuracy")))
        if progress.checkpoint_due(step + 1):  # every --save-every steps, and on Ctrl-C; with the critic and betas
            save_pretrained(model, tokenizer, output_dir / "checkpoint",
                            {"step": step + 1, "optimizer": optimizer_state(trained, optimizer),
                             "scheduler": scheduler.state_dict(), "beta": beta, "beta_pen": beta_pen,
                             "critic": full_state_dict(critic)})
            progress.stop_if_requested(step + 1, output_dir)
    save_pretrained(model, tokenizer, output_dir / "final", merge_lora=args.merge_lora)
    return metrics


def metrics_row(step: int, stats: dict, scores, correct, kl, mask, old_values, returns, truncated, prompt_mask,
                kl_per_completion: float, beta: float, beta_pen: float, lr: float, t0: float, t_sample: float,
                t_train: float, ppo_epochs: int) -> dict:
    """The step's line of metrics.jsonl: losses and statistics of every rank, rewards of the global batch; with
    --policy-loss penalty, the KL the updates made (penalty_kl) and beta_pen after its adaptation."""
    lengths, truncated = gather(mask.sum(1).float()), gather(truncated)  # the global batch's
    scores, correct = gather(scores), gather(correct)
    n_tokens = int(lengths.sum())
    stats = {k: all_reduce(fmean(v)) / world_size() if k in ("clip_frac", "value_clip_frac", "entropy")
             else fmean(v) for k, v in stats.items() if v}  # micro-batch means: the mean over ranks
    return {"step": step, **stats, "reward_mean": scores.mean().item(), "reward_std": scores.std(correction=0).item(),
            "accuracy": correct.mean().item(), "kl_k1": masked_mean(*map(gather, (kl, mask))).item(),
            "kl_per_completion": kl_per_completion, "beta": beta,
            **({"beta_pen": beta_pen} if "penalty_kl" in stats else {}),  # --policy-loss penalty: after adapting
            "explained_variance": explained_variance(*map(gather, (old_values, returns, mask))), "lr": lr,
            "completion_len": lengths.mean().item(), "completion_len_max": int(lengths.max()),
            "truncated_frac": truncated.float().mean().item(), "sample_tokens_per_s": int(n_tokens / t_sample),
            "train_tokens_per_s": int(ppo_epochs * (all_reduce(prompt_mask.sum()) + n_tokens) / t_train),
            "step_time": time.time() - t0}


def logprobs_of(model, sequences, rows, temperature: float):
    """(log pi(o_t | q, o_<t), entropy) for some rows of (prompt_ids, prompt_mask, completion_ids, completion_mask)."""
    return completion_logprobs(model, *(t[rows] for t in sequences), temperature)


@torch.no_grad()
def rollout_kl(model, sequences, old_logprobs, micro_batches, temperature: float, device, dtype) -> float:
    """KL(pi_old || pi_theta) after a rollout's updates, the k3 estimate r - 1 - log r averaged over every token of
    the global batch (the PPO paper's d, which [PPO-PENALTY] compares with d_targ): one more no-grad pass."""
    with autocast(device, dtype):
        logprobs = torch.cat([logprobs_of(model, sequences, mb, temperature)[0] for mb in micro_batches])
    log_ratio, mask = logprobs - old_logprobs, sequences[3]
    return all_reduce(((torch.expm1(log_ratio) - log_ratio) * mask).sum()) / max(all_reduce(mask.sum()), 1)


if __name__ == "__main__":
    with exit_on_error():
        main(parse_args(Args, __doc__))
