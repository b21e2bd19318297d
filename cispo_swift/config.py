"""CISPO options: one dataclass, validated, built from `CISPO_*` environment variables or keyword arguments.

swift parses its command line before plugins load and rejects unknown flags, so options that swift does not
have arrive as environment variables (swift's YAML configs set them in their `ENV:` block) or through
`cispo_swift.configure(...)` for users who build `RLHFArguments` in code.

Start-up checks live here too (`check_run`): the plugin file runs them while swift parses its arguments, before
any model loads, and the trainer runs them again at start for the Python API. One rule: a value that cannot work
is refused (ValueError: what, why, what to do); a setting that has no effect in the chosen combination is
logged as a warning. swift's own flags keep their meaning:
`--epsilon_high` is the CISPO bound (the absolute cap by default), `--epsilon` the PPO reference of the
zero-gradient metric.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set

from cispo_swift.fused import DEFAULT_CHUNK_SIZE
from cispo_swift.loss import CLIP_MODES, NORM_MODES

ENV_PREFIX = 'CISPO_'
ANCHORS = ('old', 'rollout')
# ScaleRL's ε_max (arXiv 2510.13786): the cap used when --epsilon_high is not given. swift would fall back to
# --epsilon (0.2) and scale every weight down to ≤ 0.2.
DEFAULT_WEIGHT_CAP = 5.0


def _opt(default, help_text: str, choices=None):
    return field(default=default, metadata={'help': help_text, 'choices': choices})


@dataclass
class CISPOConfig:
    """CISPO options beyond swift's flags. Each field `name` is read from the variable `CISPO_<NAME>`."""

    clip_mode: str = _opt(
        'absolute',
        'How --epsilon_high bounds the weight. `absolute`: w = min(r, ε_high), ε_high is the cap itself (swift, '
        'TRL, ScaleRL; default cap 5.0). `relative`: w = clip(r, 1 − ε_low, 1 + ε_high), MiniMax-M1 eq. 5 '
        '(verl, SkyRL, NeMo-RL); default ε_high 4.0, i.e. the same cap 5.0. Use `relative` to reproduce a run or '
        'a config written for those frameworks.',
        CLIP_MODES,
    )
    eps_low: Optional[float] = _opt(
        None,
        'Lower bound of the weight in `relative` mode: w ≥ 1 − eps_low. Unset: no lower bound (the paper and '
        'ScaleRL; a positive lower bound has been reported to let the sampler/trainer KL run away).',
    )
    mask: bool = _opt(
        False,
        'Unified token mask, MiniMax-M1 eq. 6–7: drop tokens with (Â > 0, r > 1 + mask_eps_high) or '
        "(Â < 0, r < 1 − mask_eps_low). Small eps recover PPO's trust region; large eps are plain CISPO. Use it "
        'to put a trust region back when many off-policy updates per batch destabilise training (ROLL and '
        'Trinity-RFT offer the same mask).',
    )
    mask_eps_low: float = _opt(
        0.2, 'ε_low of the unified mask (relative: drops Â < 0 tokens with r < 1 − ε; 1 or more: none dropped).'
    )
    mask_eps_high: float = _opt(
        0.2, 'ε_high of the unified mask (relative: drops Â > 0 tokens with r > 1 + ε; `inf`: none dropped).'
    )
    anchor: str = _opt(
        'old',
        'Denominator of r. `old`: π_old recomputed by the trainer (the paper). `rollout`: the inference '
        "engine's log-probs (SkyRL), so single-step on-policy training still corrects the train/inference "
        'mismatch instead of having r ≡ 1. Needs rollout log-probs (vLLM generation). Use it with vLLM and '
        '--num_iterations 1, where the `old` anchor makes CISPO plain REINFORCE.',
        ANCHORS,
    )
    norm: str = _opt(
        'token',
        'Loss normalisation. `token`: Σ over tokens / total completion tokens of the generation batch (paper '
        "eq. 4, DAPO). `sequence`: mean of per-sequence means (GRPO paper). `prompt`: each prompt group's token "
        "sum over its own token count, averaged over groups (ScaleRL's prompt-level averaging, part of its "
        'recipe; keeps long answers from dominating across prompts while weighting tokens equally within one).',
        NORM_MODES,
    )
    kl_budget: Optional[float] = _opt(
        None,
        'KL budget per generation batch: when cispo/approx_kl, the mean k3 estimate of KL(π_old || π_θ) over the '
        "micro-batch's loss tokens (exact across ranks), exceeds it, that optimizer step and the remaining steps of "
        'the generation batch are skipped (the optimizer does not step, so Adam and weight decay do not move the '
        "weights either) until new completions are generated. PPO's target_kl early stop, for --num_iterations > 1 "
        'or --steps_per_generation > --gradient_accumulation_steps. Unset: never skip. Logged: '
        'cispo/kl_budget_skipped (fraction of optimizer steps skipped).',
    )
    skip_no_signal: bool = _opt(
        False,
        'Skip an optimizer step whose gradient is exactly zero on every parameter on every rank (every advantage 0 '
        "and no KL or auxiliary term, or no loss tokens): the weights, Adam's moments and its step counter stay as "
        'they were, and weight decay does not apply. Without it AdamW keeps moving the policy along its momentum on '
        'steps that carry no signal. Off by default: over 40 steps on SmolLM2 it ended 1 of 10 runs below half the '
        "base accuracy against the budget alone's 2, but in the demo's regime lowered the median held-out accuracy "
        'averaged over the run (0.522 against 0.575), '
        "and swift's --dynamic_sample true, which replaces the groups with no signal, did better on both counts "
        '(docs/cispo_horizon.md). Logged: cispo/no_signal_skipped (1 or 0 per optimizer step).',
    )
    fp32_lm_head: bool = _opt(
        False,
        "Compute the trainer's LM head (logits) in float32 even when the model runs in bf16 (MiniMax-M1 §3.1: "
        "train/inference probability correlation 0.987 → 0.997; also in ScaleRL's recipe). Use it with bf16 "
        "models, above all with vLLM generation; for vLLM's side pass --vllm_engine_kwargs "
        '\'{"hf_overrides": {"head_dtype": "float32"}}\'.',
    )
    fused_logps: bool = _opt(
        False,
        "Compute the sampled tokens' log-probs from the last hidden states and the LM head in chunks of tokens, "
        'never holding the [B, T, V] logits (recomputed chunk by chunk in backward). For long completions and '
        'large vocabularies; works on any device. Where not supported (multimodal, sequence parallel, LoRA '
        "on lm_head, scaled/soft-capped logits) swift's path runs, with a warning saying why.",
    )
    fused_chunk_size: int = _opt(
        DEFAULT_CHUNK_SIZE,
        'Tokens per chunk of the fused log-prob path: extra memory ≈ chunk · vocab · 6 bytes (fp32 logits and '
        'their softmax), time nearly flat above a few hundred tokens.',
    )
    check_finite: bool = _opt(
        True,
        'Stop with an error naming the step, tensor, token count and sequences when a value that reaches the loss '
        '(log-prob, anchor, advantage, reference log-prob, rollout IS weight, normalisation) is NaN/inf at a token '
        'in the loss, before the optimizer step (costs one sync per micro-batch).',
    )
    allow_config_change: bool = _opt(
        False,
        'Resume (--resume_from_checkpoint) even though the CISPO settings saved in the checkpoint '
        '(cispo_config.json) differ from the current ones. By default such a resume is refused before training, '
        'listing each difference, because the loss would change mid-run; set this only when the change is intended.',
    )

    def __post_init__(self):
        # One parser for every way in: a keyword of `configure`, a constructor argument and a variable all go through
        # `_parse`, so `mask='no'`, `mask=False` and CISPO_MASK=no are the same setting, and `fused_logps=2` is refused
        # as CISPO_FUSED_LOGPS=2 is.
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Refuse values that cannot work. Settings that merely have no effect are warned about by `check_run`."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get('choices')
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(
                    f'{_env_name(f.name)}={value!r} is not valid: it must be one of {", ".join(choices)}. '
                    f'{f.metadata["help"]}'
                )
        if self.eps_low is not None and not 0.0 <= self.eps_low <= 1.0:  # NaN fails too
            raise ValueError(
                f'CISPO_EPS_LOW={self.eps_low} is out of range: the lower bound 1 − eps_low must lie in [0, 1], '
                'so eps_low must be in [0, 1]. Unset it for no lower bound (recommended).'
            )
        if self.kl_budget is not None and not (0.0 < self.kl_budget < math.inf):  # NaN fails too
            raise ValueError(
                f'CISPO_KL_BUDGET={self.kl_budget} must be a finite number > 0 (a KL in nats, e.g. 0.05), or unset '
                'for no budget.'
            )
        if not self.fused_chunk_size >= 1:
            raise ValueError(f'CISPO_FUSED_CHUNK_SIZE={self.fused_chunk_size} must be a positive number of tokens.')
        for name in ('mask_eps_low', 'mask_eps_high'):
            value = getattr(self, name)
            if not value >= 0:  # NaN fails too
                raise ValueError(
                    f'{_env_name(name)}={value} must be a number ≥ 0 (inf: that side of the mask never drops a '
                    'token): it is the width of the unified mask.'
                )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> CISPOConfig:
        """Options from `CISPO_*` variables, then `overrides` (keyword arguments win; the variables they do not
        name still apply). Unknown variables fail; an override takes the values its variable takes (see `_coerce`)."""
        environ = os.environ if environ is None else environ
        valid = {_env_name(f.name): f for f in dataclasses.fields(cls)}
        # Environment names are case-sensitive: `cispo_norm` would be ignored, so any casing of the prefix counts.
        unknown = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k not in valid)
        if unknown:
            hints = [f'{k} → {k.upper()}' for k in unknown if k.upper() in valid]
            hint = f' Variable names are upper case: {", ".join(hints)}.' if hints else ''
            raise ValueError(
                f'Unknown CISPO option variable(s): {", ".join(unknown)}.{hint} Valid ones: '
                f'{", ".join(sorted(valid))}. Check the spelling (see the options table in the cispo-swift README).'
            )
        kwargs = {f.name: _parse(name, environ[name], f) for name, f in valid.items() if name in environ}
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise TypeError(
                f'Unknown CISPO option(s): {", ".join(bad)}. Valid ones: '
                f'{", ".join(f.name for f in dataclasses.fields(cls))}.'
            )
        kwargs.update(overrides)
        return cls(**kwargs)


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


_FLOAT = re.compile(r'[+-]?((\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|inf|infinity)', re.IGNORECASE)
_INT = re.compile(r'[+-]?\d+')
_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')


def _coerce(f: dataclasses.Field, value):
    """A value given in Python (a keyword of `configure`, a `CISPOConfig` argument) as the equal `CISPO_*` value:
    a str as written, a bool as true/false, a number as its literal, None as "unset" where the option can be unset;
    then `_parse`. So a value is accepted or refused exactly as the variable would be."""
    name = _env_name(f.name)
    if value is None and 'Optional' in str(f.type):
        return None
    if isinstance(value, bool):
        text = 'true' if value else 'false'
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(
            f'{f.name}={value!r} ({type(value).__name__}): a CISPO option takes a str, bool or number, the values '
            f'its variable {name} takes. {f.metadata["help"]}'
        )
    try:
        return _parse(name, text, f)
    except ValueError as error:
        shown = value if isinstance(value, str) else text
        raise ValueError(f'{f.name}={value!r} is refused as {name}={shown} would be: {error}') from None


def _parse(env_name: str, raw: str, f: dataclasses.Field):
    """One `CISPO_*` value. One rule for every option: an empty value is refused (unset the variable for the
    default); numbers are plain decimal literals (no `1_0`, no hex), NaN is refused, and a literal beyond the float
    range is refused rather than read as inf (1e309) or 0 (1e-400)."""
    text = raw.strip()
    kind = f.type if isinstance(f.type, str) else getattr(f.type, '__name__', str(f.type))
    default = 'unset' if f.default is None else int(f.default) if isinstance(f.default, bool) else f.default
    if not text:
        raise ValueError(
            f'{env_name} is set but empty: an empty value is not a setting. Unset the variable for the default '
            f'({default}), or give a value. {f.metadata["help"]}'
        )
    if 'bool' in kind:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f'{env_name}={raw!r} is not a boolean: use 1/0 (or true/false).')
    if 'float' in kind:
        if 'Optional' in kind and text.lower() == 'none':
            return None
        if text.lower() == 'nan':
            raise ValueError(f'{env_name}={raw!r}: NaN is not a valid setting. {f.metadata["help"]}')
        if not _FLOAT.fullmatch(text):
            raise ValueError(f'{env_name}={raw!r} is not a number. {f.metadata["help"]}')
        value = float(text)
        if math.isinf(value) and 'inf' not in text.lower():
            raise ValueError(
                f'{env_name}={raw!r} is beyond the float range and would read as inf; write inf if that is meant.'
            )
        if value == 0.0 and re.search('[1-9]', re.split('[eE]', text)[0]):
            raise ValueError(
                f'{env_name}={raw!r} is below the float range and would read as 0; write 0 if that is meant. '
                f'{f.metadata["help"]}'
            )
        return value
    if 'int' in kind:
        if not _INT.fullmatch(text):
            raise ValueError(f'{env_name}={raw!r} is not an integer. {f.metadata["help"]}')
        return int(text)
    return text


def options_table() -> str:
    """The options as a Markdown table (the README's table is generated from this)."""
    rows = ['| variable | default | meaning |', '|---|---|---|']
    for f in dataclasses.fields(CISPOConfig):
        default = 'unset' if f.default is None else f.default
        if isinstance(default, bool):
            default = int(default)
        rows.append(f'| `{_env_name(f.name)}` | `{default}` | {f.metadata["help"]} |')
    return '\n'.join(rows)


_configured: Optional[CISPOConfig] = None


def configure(config: Optional[CISPOConfig] = None, **kwargs) -> CISPOConfig:
    """Python API: set the options the trainer will use and register it, before `rlhf_main(args)`.

    `configure(norm='prompt')`: the `CISPO_*` variables, with these keywords winning over them. Each keyword takes
    the values of its variable, through the same parser and checks (`'no'`, `False` and `0` are the same for a
    switch), and a wrong one is refused here. `configure(CISPOConfig(...))`: exactly that config, variables ignored.
    """
    global _configured
    if config is not None and not isinstance(config, CISPOConfig):
        raise TypeError(
            f'configure() takes keyword options or a CISPOConfig, not {type(config).__name__} {config!r}. '
            'For a dict of options write configure(**options).'
        )
    if config is not None and kwargs:
        raise TypeError('configure() takes a CISPOConfig or keyword options, not both.')
    _configured = config if config is not None else CISPOConfig.from_env(**kwargs)
    from cispo_swift.registry import register

    register()
    return _configured


def current_config() -> CISPOConfig:
    """The options in force: those given to `configure`, else the environment."""
    return _configured if _configured is not None else CISPOConfig.from_env()


def is_configured() -> bool:
    """Whether CISPO options were given at all: by `configure(...)` or by a `CISPO_*` variable."""
    return _configured is not None or any(k.startswith(ENV_PREFIX) for k in os.environ)


# ---- start-up checks of a run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """What the options and swift's flags make of the CISPO weight: the bound `--epsilon_high` stands for in the
    chosen convention, the (lower, upper) bounds of w, and a note when --epsilon_high was not given."""

    eps_high: float
    lower: Optional[float]
    upper: Optional[float]
    default_note: Optional[str] = None


def resolve_weight(args, cfg: CISPOConfig) -> Resolved:
    """The weight bounds from `--epsilon_high` and CISPO_CLIP_MODE / CISPO_EPS_LOW; refuses bounds that cannot
    work (NaN, ≤ 0, an absolute cap below 1). `inf` means no cap."""
    from cispo_swift.loss import clip_bounds

    if args.epsilon_high is None:
        # swift falls back to --epsilon here, i.e. every weight capped at 0.2.
        eps_high = DEFAULT_WEIGHT_CAP if cfg.clip_mode == 'absolute' else DEFAULT_WEIGHT_CAP - 1.0
        note = (
            f'--epsilon_high not given: using {eps_high} (weight cap {DEFAULT_WEIGHT_CAP}, ScaleRL) instead of '
            f"swift's fallback to --epsilon={args.epsilon}, which would cap every weight at {args.epsilon}"
        )
        return Resolved(eps_high, *clip_bounds(eps_high, cfg.eps_low, cfg.clip_mode), default_note=note)
    eps_high = float(args.epsilon_high)
    if not eps_high > 0:  # NaN fails too
        raise ValueError(
            f'--epsilon_high {eps_high} with --loss_type cispo: the bound must be a positive number (inf: no cap). '
            'Use e.g. --epsilon_high 5.0 (ScaleRL), or leave it unset for that default.'
        )
    if cfg.clip_mode == 'absolute' and eps_high < 1.0:
        raise ValueError(
            f'--epsilon_high {eps_high} with --loss_type cispo caps the importance weight min(r, ε_high) '
            f'at {eps_high} < 1: every on-policy token (r = 1) would be down-weighted to {eps_high}, '
            'shrinking the whole loss. Use a cap ≥ 1, e.g. --epsilon_high 5.0 (ScaleRL). If you meant '
            'the relative convention clip(r, ·, 1 + ε_high) (verl, MiniMax-M1 eq. 5), set CISPO_CLIP_MODE=relative.'
        )
    return Resolved(eps_high, *clip_bounds(eps_high, cfg.eps_low, cfg.clip_mode))


# swift's numeric flags that reach the CISPO loss or its metrics.
NUMERIC_FLAGS = (
    'epsilon_high',
    'epsilon',
    'beta',
    'delta',
    'temperature',
    'top_entropy_quantile',
    'rollout_importance_sampling_threshold',
    'off_policy_sequence_mask_delta',
)


def check_run(args, cfg: CISPOConfig) -> Resolved:
    """Every check of a `--loss_type cispo` run that its arguments and the options allow, before any model loads.

    `args` is swift's RLHFArguments (the plugin file, at argument parsing) or the trainer's GRPOConfig (trainer
    start): both carry the flags read here. Refusals raise ValueError; settings without effect are warned about.
    """
    for flag in NUMERIC_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f'--{flag} nan: NaN is not a valid setting; it would make the loss or its metrics NaN.')
    check_swift_ranges(args)
    resolved = resolve_weight(args, cfg)
    if getattr(args, 'use_liger_kernel', False):
        raise ValueError(
            '--use_liger_kernel with --loss_type cispo would bypass the cispo-swift loss (Liger computes its own '
            "CISPO, with swift's cap semantics). Remove --use_liger_kernel (CISPO_FUSED_LOGPS=1 saves the memory).",
        )
    if cfg.anchor == 'rollout' and not args.use_vllm:
        raise ValueError(
            "CISPO_ANCHOR=rollout anchors the weight on the inference engine's log-probs, which swift collects only "
            'when generating with vLLM (--use_vllm true). Use --use_vllm true, or CISPO_ANCHOR=old.'
        )
    if cfg.norm != 'token' and (getattr(args, 'sequence_parallel_size', 1) or 1) > 1:
        raise ValueError(
            f'CISPO_NORM={cfg.norm} needs every sequence of the generation batch on its rank; sequence parallelism '
            'splits them. Use CISPO_NORM=token with --sequence_parallel_size > 1.'
        )
    if getattr(args, 'deepspeed', None):
        from cispo_swift.deepspeed_gate import check_settings

        check_settings(args.deepspeed, cfg.kl_budget, cfg.skip_no_signal)
    level = args.importance_sampling_level
    if level not in ('token', 'sequence', 'sequence_token'):
        raise ValueError(
            f'--importance_sampling_level {level!r} is not one of token, sequence, sequence_token (swift 4.6.0 '
            "would fail on it inside the loss). CISPO uses `token` (the paper); the sequence levels use GSPO's ratio."
        )
    if level != 'token' and cfg.norm == 'token':
        warn_once(
            f'--importance_sampling_level {level} with CISPO_NORM=token: each sequence has one weight, and the '
            'token-sum normalisation then weighs a sequence by its length. CISPO_NORM=sequence gives every sequence '
            'the same weight (GSPO averages per sequence).'
        )
    for message in ineffective_settings(args, cfg) + notable_settings(args, resolved):
        warn_once(message)
    return resolved


# swift flags whose values swift accepts but that make a CISPO run meaningless: (flag, test, what it must be, why).
_RANGES = (
    ('beta', lambda v: 0.0 <= v < math.inf, 'a finite number ≥ 0 (0: no KL term)',
     'inf makes every loss 0 and every gradient NaN, so the weights never move; a negative β rewards drifting from '
     'the reference model'),
    ('epsilon', lambda v: 0.0 <= v < math.inf, 'a finite number ≥ 0 (e.g. 0.2)',
     "it is the PPO ε of the cispo/ppo_zero_grad_frac metric (and of swift's other losses); a negative ε counts "
     'every token as clipped'),
    ('temperature', lambda v: 0.0 < v < math.inf, 'a finite number > 0 (e.g. 1.0, or 0.7)',
     'sampling divides the logits by it (0: division by zero, NaN log-probs at the first step; negative: the '
     'least likely tokens are sampled), and the trainer scores the completions at the same temperature'),
    ('top_entropy_quantile', lambda v: 0.0 < v <= 1.0, 'a number in (0, 1] (1.0: every token; 0.2: the top 20%)',
     'it is the share of tokens, by entropy, kept in the loss; 0 sets the threshold at the micro-batch\'s largest '
     'entropy, so about one token per micro-batch trains'),
)  # fmt: skip


def effective_settings(args, cfg: CISPOConfig, resolved: Resolved) -> Dict[str, Any]:
    """Everything that determines a CISPO run's loss and its checks: the options plus the swift flags that enter it.
    Written to `cispo_config.json` (run directory and every checkpoint) and compared on resume."""
    return {
        **cfg.to_dict(),
        'epsilon_high': resolved.eps_high,
        'weight_lower': resolved.lower,
        'weight_upper': resolved.upper,
        'ppo_epsilon_for_metrics': args.epsilon,
        'importance_sampling_level': args.importance_sampling_level,
        'beta': args.beta,
        'loss_type': 'cispo',
    }


def summary_line(settings: Mapping[str, Any], fused_active: Optional[bool] = None) -> str:
    """The "CISPO loss active" log line: every setting of `effective_settings` that changes the run.
    `fused_active`: whether the fused log-prob path really runs (None: as requested)."""
    s = settings
    lo, hi = s['weight_lower'], s['weight_upper']
    weight = f'min(r, {hi})' if s['clip_mode'] == 'absolute' else f'clip(r, {"-inf" if lo is None else lo}, {hi})'
    mask = f'{"on" if s["mask"] else "off"} (eps {s["mask_eps_low"]:g}/{s["mask_eps_high"]:g})'
    fused = int(s['fused_logps'] if fused_active is None else fused_active)
    chunk = f' (chunk {s["fused_chunk_size"]})'
    budget = 'off' if s['kl_budget'] is None else f'{s["kl_budget"]:g}'
    eps_low = 'unset' if s['eps_low'] is None else f'{s["eps_low"]:g}'
    return (
        f'cispo-swift: CISPO loss active: w = sg({weight}) [{s["clip_mode"]}, eps_low {eps_low}], norm={s["norm"]}, '
        f'anchor={s["anchor"]}, unified_mask={mask}, is_level={s["importance_sampling_level"]}, beta={s["beta"]}, '
        f'fp32_lm_head={int(s["fp32_lm_head"])}, fused_logps={fused}{chunk}, kl_budget={budget}, '
        f'skip_no_signal={int(s["skip_no_signal"])}, check_finite={int(s["check_finite"])}, '
        f'allow_config_change={int(s["allow_config_change"])}, '
        f'ppo_epsilon(metric)={s["ppo_epsilon_for_metrics"]}'
    )


def check_swift_ranges(args) -> None:
    """Refuse swift flag values that swift accepts but that cannot give a meaningful CISPO run (ValueError)."""
    for flag, ok, must, why in _RANGES:
        value = getattr(args, flag, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(float(value)):
            raise ValueError(f'--{flag} {value} with --loss_type cispo: it must be {must}; {why}.')
    iterations = getattr(args, 'num_iterations', 1)
    if isinstance(iterations, int) and iterations < 1:
        raise ValueError(
            f'--num_iterations {iterations}: it must be an integer ≥ 1 (the optimizer steps per generation batch); '
            'with 0 the run loads the model and ends after 0 steps. Use 1 for on-policy training.'
        )
    per_generation = getattr(args, 'steps_per_generation', None)
    if isinstance(per_generation, int) and per_generation < 1:
        raise ValueError(f'--steps_per_generation {per_generation}: it must be an integer ≥ 1 (or unset).')


def notable_settings(args, resolved: Resolved) -> List[str]:
    """Warnings for legitimate values whose effect a user may not expect."""
    notes = []
    if resolved.upper is not None and math.isinf(resolved.upper):
        notes.append(
            '--epsilon_high inf: no cap on the CISPO weight r = π_θ/π_old (any value beyond 1.8e308, e.g. 1e309, '
            'reads as inf too). A token whose log-ratio passes 88.7 overflows float32; with CISPO_CHECK_FINITE=1 '
            'the run then stops naming the step. Set a finite cap, e.g. --epsilon_high 5.0, unless this is meant.'
        )
    return notes


def ineffective_settings(args, cfg: CISPOConfig) -> List[str]:
    """Messages for settings that have no effect in this combination (the rule: warn, do not refuse)."""
    default = CISPOConfig()
    unused = []
    if args.delta is not None:
        unused.append(
            f'--delta {args.delta} has no effect with --loss_type cispo: the two-sided clip of the ratio it bounds '
            'does not exist in CISPO (the clipped weight is detached). It is ignored.'
        )
    if cfg.eps_low is not None and cfg.clip_mode != 'relative':
        unused.append(
            f'CISPO_EPS_LOW={cfg.eps_low} has no effect with CISPO_CLIP_MODE={cfg.clip_mode}: the lower bound exists '
            'only in `relative` mode. Unset CISPO_EPS_LOW or set CISPO_CLIP_MODE=relative.'
        )
    for name in ('mask_eps_low', 'mask_eps_high'):
        if not cfg.mask and getattr(cfg, name) != getattr(default, name):
            unused.append(
                f'{_env_name(name)}={getattr(cfg, name)} has no effect without CISPO_MASK=1 (the unified mask is off).'
            )
    if cfg.mask and cfg.anchor == 'old' and _on_policy_only(args):
        unused.append(
            'CISPO_MASK=1 has no effect: with --num_iterations 1 and --steps_per_generation equal to '
            '--gradient_accumulation_steps every optimizer step is on-policy, so r = π_θ/π_old is 1 at every token '
            'and the mask drops none. It bounds off-policy updates: use it with --num_iterations > 1 (or '
            'CISPO_ANCHOR=rollout with vLLM).'
        )
    elif cfg.mask and cfg.mask_eps_low >= 1.0 and math.isinf(cfg.mask_eps_high):
        unused.append(
            f'CISPO_MASK=1 has no effect with CISPO_MASK_EPS_LOW={cfg.mask_eps_low} (≥ 1: r < 1 − ε never holds) and '
            'CISPO_MASK_EPS_HIGH=inf: neither side drops a token. Give a finite width (e.g. 0.2, the default), or '
            'unset CISPO_MASK.'
        )
    if cfg.kl_budget is not None and _on_policy_only(args):
        unused.append(
            f'CISPO_KL_BUDGET={cfg.kl_budget} has no effect: with --num_iterations 1 and --steps_per_generation equal '
            'to --gradient_accumulation_steps every optimizer step is on-policy (approx_kl 0), so no step is skipped.'
        )
    if not cfg.fused_logps and cfg.fused_chunk_size != default.fused_chunk_size:
        unused.append(f'CISPO_FUSED_CHUNK_SIZE={cfg.fused_chunk_size} has no effect without CISPO_FUSED_LOGPS=1.')
    if cfg.allow_config_change and not getattr(args, 'resume_from_checkpoint', None):
        unused.append('CISPO_ALLOW_CONFIG_CHANGE=1 has no effect without --resume_from_checkpoint.')
    return unused


def _on_policy_only(args) -> bool:
    """Every optimizer step on completions of the current policy: one use of each generation batch, one step."""
    iterations = getattr(args, 'num_iterations', 1) or 1
    accumulation = getattr(args, 'gradient_accumulation_steps', 1) or 1
    per_generation = getattr(args, 'steps_per_generation', None) or accumulation
    return iterations == 1 and per_generation <= accumulation


def warn_unused_options(loss_type) -> None:
    """CISPO options given for a run whose loss is not cispo: the plugin leaves such runs to swift, say so."""
    if loss_type != 'cispo' and is_configured():
        given = sorted(k for k in os.environ if k.startswith(ENV_PREFIX))
        warn_once(
            f'{", ".join(given) or "cispo_swift.configure(...)"} set, but --loss_type is {loss_type!r}: the CISPO '
            "options apply only to --loss_type cispo, and this run uses swift's own loss unchanged."
        )


_warned: Set[str] = set()


def warn_once(message: str) -> None:
    """A warning in swift's log, once per process (the plugin file and the trainer run the same checks)."""
    if message in _warned:
        return
    _warned.add(message)
    from swift.utils import get_logger

    get_logger().warning(f'cispo-swift: {message}')


def check_launch(args) -> None:
    """Refuse a multi-process launch that would train every process alone.

    Without a GPU, swift's launcher starts a gloo process group, but transformers only trains data-parallel on CPU
    with `--use_cpu true`; otherwise each process sees world size 1, trains on its own full batch (normalised by
    its own token count) and all of them write the same output_dir.
    """
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world > 1 and args.world_size != world:
        raise RuntimeError(
            f'{world} processes were launched (NPROC_PER_NODE/torchrun), but the trainer runs with world size '
            f'{args.world_size}: each process would train alone on its own batch and overwrite the '
            "others' output. On a machine without GPUs add --use_cpu true (data parallel over gloo); "
            'otherwise launch a single process.'
        )


def check_loss_type(loss_type) -> None:
    """Refuse a `--loss_type` that looks like a misspelt `cispo`: the plugin takes over `--loss_type cispo` only,
    so such a run would go to swift's code (which fails on an unknown loss type only inside the loss, after the
    model has loaded) without the CISPO loss. Other loss types pass untouched."""
    if not isinstance(loss_type, str) or loss_type == 'cispo':
        return
    if loss_type.strip().lower() == 'cispo' or difflib.get_close_matches(loss_type.lower(), ['cispo'], cutoff=0.75):
        raise ValueError(
            f"--loss_type {loss_type!r} is not 'cispo': cispo-swift only takes over --loss_type cispo, and swift "
            'knows no such loss type. Use --loss_type cispo.'
        )
