"""CISPO options: one dataclass, validated, built from `CISPO_*` environment variables or keyword arguments.

swift parses its command line before plugins load and rejects unknown flags, so options that swift does not
have arrive as environment variables (swift's YAML configs set them in their `ENV:` block) or through
`cispo_swift.configure(...)` for users who build `RLHFArguments` in code. swift's own flags keep their meaning:
`--epsilon_high` is the CISPO bound (the absolute cap by default), `--epsilon` the PPO reference of the
zero-gradient metric.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

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
    mask_eps_low: float = _opt(0.2, 'ε_low of the unified mask (relative: drops Â < 0 tokens with r < 1 − ε).')
    mask_eps_high: float = _opt(0.2, 'ε_high of the unified mask (relative: drops Â > 0 tokens with r > 1 + ε).')
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
    fp32_lm_head: bool = _opt(
        False,
        "Compute the trainer's LM head (logits) in float32 even when the model runs in bf16 (MiniMax-M1 §3.1: "
        "train/inference probability correlation 0.987 → 0.997; also in ScaleRL's recipe). Use it with bf16 "
        'models, above all with vLLM generation.',
    )
    fused_logps: bool = _opt(
        False,
        "Compute the sampled tokens' log-probs from the last hidden states and the LM head in chunks of tokens, "
        'never holding the [B, T, V] logits (recomputed chunk by chunk in backward). For long completions and '
        "large vocabularies; works on any device. Falls back to swift's path, with one log line, where not "
        'supported (multimodal, sequence parallel, ZeRO-3, LoRA on lm_head, scaled/soft-capped logits).',
    )
    fused_chunk_size: int = _opt(
        DEFAULT_CHUNK_SIZE,
        'Tokens per chunk of the fused log-prob path: extra memory ≈ chunk · vocab · 6 bytes (fp32 logits and '
        'their softmax), time nearly flat above a few hundred tokens.',
    )
    check_finite: bool = _opt(
        True,
        'Stop with an error naming the step, tensor, token count and sequences when a log-prob, anchor or '
        'advantage of a completion token is NaN/inf, before the optimizer step (costs one sync per micro-batch).',
    )
    allow_config_change: bool = _opt(
        False,
        'Resume (--resume_from_checkpoint) even though the CISPO settings saved in the checkpoint '
        '(cispo_config.json) differ from the current ones. By default such a resume is refused before training, '
        'listing each difference, because the loss would change mid-run; set this only when the change is intended.',
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get('choices')
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(
                    f'{_env_name(f.name)}={value!r} is not valid: it must be one of {", ".join(choices)}. '
                    f'{f.metadata["help"]}'
                )
        if self.eps_low is not None:
            if self.clip_mode != 'relative':
                raise ValueError(
                    f'CISPO_EPS_LOW={self.eps_low} has no effect with CISPO_CLIP_MODE={self.clip_mode}: the lower '
                    'bound exists only in `relative` mode. Unset CISPO_EPS_LOW or set CISPO_CLIP_MODE=relative.'
                )
            if not 0.0 <= self.eps_low <= 1.0:
                raise ValueError(
                    f'CISPO_EPS_LOW={self.eps_low} is out of range: the lower bound 1 − eps_low must lie in [0, 1], '
                    'so eps_low must be in [0, 1]. Unset it for no lower bound (recommended).'
                )
        if self.fused_chunk_size < 1:
            raise ValueError(f'CISPO_FUSED_CHUNK_SIZE={self.fused_chunk_size} must be a positive number of tokens.')
        for name in ('mask_eps_low', 'mask_eps_high'):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f'{_env_name(name)}={value} must be ≥ 0: it is the width of the unified mask.')

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides) -> CISPOConfig:
        """Options from `CISPO_*` variables, then `overrides` (keyword arguments win). Unknown variables fail."""
        environ = os.environ if environ is None else environ
        valid = {_env_name(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in valid)
        if unknown:
            raise ValueError(
                f'Unknown CISPO option variable(s): {", ".join(unknown)}. Valid ones: {", ".join(sorted(valid))}. '
                'Check the spelling (see the options table in the cispo-swift README).'
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


def _parse(env_name: str, raw: str, f: dataclasses.Field):
    text = raw.strip()
    kind = f.type if isinstance(f.type, str) else getattr(f.type, '__name__', str(f.type))
    if 'bool' in kind:
        lowered = text.lower()
        if lowered in ('1', 'true', 'yes', 'on'):
            return True
        if lowered in ('0', 'false', 'no', 'off', ''):
            return False
        raise ValueError(f'{env_name}={raw!r} is not a boolean: use 1/0 (or true/false).')
    if 'float' in kind:
        if 'Optional' in kind and text.lower() in ('', 'none'):
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f'{env_name}={raw!r} is not a number. {f.metadata["help"]}') from None
    if 'int' in kind:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f'{env_name}={raw!r} is not an integer. {f.metadata["help"]}') from None
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
    """Python API: set the options the trainer will use (instead of `CISPO_*` variables) and register it.

    `configure(norm='prompt')` or `configure(CISPOConfig(...))`, before `rlhf_main(args)`.
    """
    global _configured
    if config is not None and kwargs:
        raise TypeError('configure() takes a CISPOConfig or keyword options, not both.')
    _configured = config if config is not None else CISPOConfig.from_env(environ={}, **kwargs)
    from cispo_swift.registry import register

    register()
    return _configured


def current_config() -> CISPOConfig:
    """The options in force: those given to `configure`, else the environment."""
    return _configured if _configured is not None else CISPOConfig.from_env()
