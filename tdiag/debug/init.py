"""Initialisation checks: the model as built, before any step.

- ``init.std-out-of-range``: each weight matrix's std against ``1/sqrt(fan_in)`` (the scale
  that keeps a layer's output variance equal to its input's); the full per-parameter table
  is an info finding.
- ``init.activation-growth``: residual-stream RMS across depth.
- ``init.logit-scale``: output logits too large at init.
- ``loss.init-mismatch``: the initial loss against ``ln(vocab)``, the loss of a uniform guess.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tdiag.debug.registry import SkipCheck, register_check
from tdiag.findings import Finding, Severity

if TYPE_CHECKING:
    from tdiag.debug.context import CheckContext

#: std * sqrt(fan_in) above this: each such layer multiplies the signal's scale by this much or
#: more. Common inits sit at 0.58 (PyTorch's default Linear), 1 (LeCun/Xavier square) and 1.41
#: (Kaiming ReLU); 3 leaves room for all of them. Judgement.
STD_RATIO_HIGH = 3.0
#: std * sqrt(fan_in) below this (and not exactly zero): the layer all but erases its input.
#: GPT-2's 0.02 at d=768 is 0.55, Megatron's scaled output init at d=12288, 96 layers ~0.16.
#: Exact zeros are left alone: zero-initialised output projections (ReZero, Fixup) are a
#: deliberate technique. Judgement.
STD_RATIO_LOW = 0.02
#: Residual-stream growth allowed from the first block's output to the last one's, as a
#: multiple of sqrt(n_blocks): adding n independent branch outputs grows the RMS like
#: sqrt(n) (GPT-2 at init grows ~3.4x over 12 layers), exponential growth does not fit under
#: 3*sqrt(n). Judgement.
ACT_GROWTH_FACTOR = 3.0
#: Initial loss more than this above ln(V): a judgement (1 nat = the model assigns the true
#: token ~e times less than a uniform guess would).
LOSS_EXCESS_MAX = 1.0
#: Std of the logits (over the vocabulary) above which the initial predictions are confidently
#: wrong: with Gaussian logits of std s the expected loss is about ln(V) + s^2/2, so this is
#: the std that costs LOSS_EXCESS_MAX nats (sqrt(2) ~ 1.41). Judgement, tied to the one above.
LOGIT_STD_MAX = math.sqrt(2 * LOSS_EXCESS_MAX)
#: Initial loss more than this below ln(V): an untrained model cannot beat a uniform guess on
#: random/held-out tokens unless it sees its targets. Judgement.
LOSS_DEFICIT_MAX = 0.5
#: A loss above ln(V) whose value divided by the number of targets lies within this fraction
#: of ln(V) is taken to be summed over tokens (the per-token loss at init is ~ln(V)).
SUMMED_TOLERANCE = 0.25


# -- parameter table ------------------------------------------------------------------------


def _fan_in(module: nn.Module, pname: str, p: torch.Tensor) -> tuple[int, bool]:
    """(fan_in, certain): certain when the layer type tells which dim is the input."""
    if isinstance(module, nn.Linear) and pname == "weight":
        return module.in_features, True
    if isinstance(module, nn.modules.conv._ConvNd) and pname == "weight":
        return p[0].numel(), True
    nf = getattr(module, "nf", None)  # Hugging Face Conv1D: weight (in, out)
    if isinstance(nf, int) and p.dim() == 2 and p.shape[1] == nf and pname == "weight":
        return p.shape[0], True
    if isinstance(module, nn.MultiheadAttention) and pname.endswith("proj_weight"):
        return p.shape[1], True
    return p[0].numel(), False  # torch's convention (out, in, ...); x @ W would be shape[0]


def _param_rows(model: nn.Module) -> list[dict[str, Any]]:
    entries = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights appear once, under their first owner
            seen.add(id(p))
            entries.append((f"{mname}.{pname}" if mname else pname, module, pname, p))
    if not entries:
        return []
    with torch.no_grad():
        stats = torch.stack(
            [
                torch.stack([p.float().mean(), p.float().std(unbiased=False)])
                if p.numel()
                else torch.zeros(2, device=p.device)
                for *_, p in entries
            ]
        ).tolist()  # host sync: once for the whole table
    rows = []
    for (name, module, pname, p), (mean, std) in zip(entries, stats, strict=True):
        row: dict[str, Any] = {
            "name": name,
            "shape": list(p.shape),
            "layer": type(module).__name__,
            "mean": mean,
            "std": std,
        }
        if p.dim() >= 2 and not isinstance(module, nn.Embedding) and not _is_table(module, pname):
            fan_in, certain = _fan_in(module, pname, p)
            row["fan_in"] = fan_in
            row["expected_std"] = 1 / math.sqrt(fan_in)
            row["ratio"] = std * math.sqrt(fan_in)
            if not certain and p.dim() == 2:  # also try the (in, out) layout; flag if both odd
                row["ratio_alt"] = std * math.sqrt(p.shape[0])
        rows.append(row)
    return rows


#: Words in the name of a raw parameter (not owned by a layer type) that make it a lookup table
#: such as ``self.pos_emb = nn.Parameter(torch.randn(L, d))``: rows are looked up, not
#: multiplied by an input, so fan-in says nothing about their scale (N(0, 1) is usual).
TABLE_WORDS = ("emb", "pos", "wpe", "wte", "token", "table", "cls")
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)


def _is_table(module: nn.Module, pname: str) -> bool:
    if isinstance(module, _LAYERS) or isinstance(getattr(module, "nf", None), int):
        return False
    return any(w in pname.lower() for w in TABLE_WORDS)


def _out_of_range(row: dict[str, Any]) -> str | None:
    ratios = [r for r in (row.get("ratio"), row.get("ratio_alt")) if r is not None]
    if not ratios or row["std"] == 0:
        return None
    if all(r > STD_RATIO_HIGH for r in ratios):
        return "high"
    if all(r < STD_RATIO_LOW for r in ratios):
        return "low"
    return None


@register_check(
    "init.std-out-of-range", family="init", title="Weight std far from what fan-in implies"
)
def std_out_of_range(ctx: CheckContext) -> list[Finding]:
    rows = _param_rows(ctx.model)
    if not rows:
        raise SkipCheck("the model has no parameters")
    findings = []
    for kind in ("high", "low"):
        bad = [r for r in rows if _out_of_range(r) == kind]
        if not bad:
            continue
        worst = max(bad, key=lambda r: abs(math.log(max(r["ratio"], 1e-12))))
        findings.append(
            Finding(
                id="init.std-out-of-range",
                severity=Severity.WARNING,
                title=f"Weights initialised too {'large' if kind == 'high' else 'small'} for their fan-in",
                message=(
                    f"{len(bad)} weight(s) have std·sqrt(fan_in) "
                    f"{'above ' + str(STD_RATIO_HIGH) if kind == 'high' else 'below ' + str(STD_RATIO_LOW)}; "
                    f"worst: {worst['name']} std {worst['std']:.3g} vs 1/sqrt({worst['fan_in']}) = "
                    f"{worst['expected_std']:.3g} (ratio {worst['ratio']:.3g})."
                ),
                where=worst["name"],
                evidence={
                    "params": [
                        {k: r[k] for k in ("name", "std", "fan_in", "expected_std", "ratio")}
                        for r in bad
                    ],
                    "limits": [STD_RATIO_LOW, STD_RATIO_HIGH],
                },
                recommendation=(
                    "Initialise weight matrices with std ~ 1/sqrt(fan_in) (e.g. normal(0, 0.02) "
                    "for d_model around 768, or nn.init.xavier_uniform_) and scale residual output "
                    "projections by 1/sqrt(2·n_layers) as GPT-2 does; a 'std < 1' rule of thumb is "
                    "not enough: what matters is std relative to 1/sqrt(fan_in)."
                    if kind == "high"
                    else "These layers shrink their input ~"
                    f"{1 / max(worst['ratio'], 1e-12):.0f}x: raise their std towards 1/sqrt(fan_in) "
                    "unless the layer is a deliberately zero/small-initialised output projection."
                ),
            )
        )
    findings.append(
        Finding(
            id="init.std-out-of-range",
            severity=Severity.INFO,
            title="Parameter statistics at init",
            message=f"{len(rows)} parameter tensors; std·sqrt(fan_in) ~ 1 keeps a layer's scale.",
            evidence={"table": rows},
        )
    )
    return findings


# -- activations and logits -----------------------------------------------------------------


@register_check(
    "init.activation-growth", family="init", title="Residual stream grows across depth at init"
)
def activation_growth(ctx: CheckContext) -> list[Finding]:
    blocks = [name for name, _ in ctx.block_modules()]
    if len(blocks) < 2:
        raise SkipCheck("no stack of >= 2 repeated blocks (nn.ModuleList) found")
    rec = ctx.recorded_forward()
    first: dict[str, float] = {}
    for r in rec["rows"]:
        if r["name"] in blocks and r["name"] not in first:
            first[r["name"]] = r["out"]["rms"]
    rms = [(b, first[b]) for b in blocks if b in first]
    if len(rms) < 2 and rec["hook_errors"]:
        raise SkipCheck(
            f"the activation hooks could not record {rec['hook_errors']} module call(s), "
            "among them the blocks' outputs (the warning on stderr says why)"
        )
    if len(rms) < 2:
        raise SkipCheck("the blocks returned no floating tensor output")
    values = [v for _, v in rms]
    if not all(math.isfinite(v) for v in values):
        raise SkipCheck("block outputs are not finite (see numerics.nonfinite-forward)")
    growth = values[-1] / values[0] if values[0] > 0 else math.inf
    limit = ACT_GROWTH_FACTOR * math.sqrt(len(values))
    if growth <= limit:
        return []
    per_block = [b / a if a > 0 else math.inf for a, b in itertools.pairwise(values)]
    worst = max(range(len(per_block)), key=lambda i: per_block[i])
    return [
        Finding(
            id="init.activation-growth",
            severity=Severity.WARNING,
            title="Activations grow with depth at init",
            message=(
                f"The RMS of the block outputs grows {growth:.3g}x from {rms[0][0]} to "
                f"{rms[-1][0]} ({values[0]:.3g} -> {values[-1]:.3g}); a residual stream of "
                f"{len(values)} blocks should grow at most ~sqrt(n) (limit {limit:.3g}x). "
                f"Largest step: {per_block[worst]:.3g}x into {rms[worst + 1][0]}."
            ),
            where=rms[worst + 1][0],
            evidence={
                "growth": growth,
                "limit": limit,
                "block_rms": {b: v for b, v in rms},
            },
            recommendation=(
                "Normalise the input of each branch (pre-LN: x + f(LN(x))) or the block output "
                "(post-LN), initialise the branches' output projections small (std "
                "0.02/sqrt(2·n_layers), or zero), and check each block adds its branch to the "
                "stream (x + f(x)) instead of multiplying or re-adding x."
            ),
        )
    ]


@register_check("init.logit-scale", family="init", title="Output logits too large at init")
def logit_scale(ctx: CheckContext) -> list[Finding]:
    logits = ctx.recorded_forward()["logits"].float()
    std, amax = torch.stack(
        [logits.std(dim=-1, unbiased=False).mean(), logits.abs().amax()]
    ).tolist()  # host sync
    if not math.isfinite(std):
        raise SkipCheck("the logits are not finite (see numerics.nonfinite-forward)")
    if std <= LOGIT_STD_MAX:
        return []
    head = _output_layer(ctx)
    return [
        Finding(
            id="init.logit-scale",
            severity=Severity.WARNING,
            title="Logits too large at init",
            message=(
                f"At init the logits have std {std:.3g} over the vocabulary (max |logit| "
                f"{amax:.3g}); a freshly initialised model should be near-uniform (std << 1). "
                f"Expected extra loss ~ std^2/2 = {std * std / 2:.3g} nats above ln(V)."
            ),
            where=head,
            evidence={"logit_std": std, "logit_abs_max": amax, "limit": LOGIT_STD_MAX},
            recommendation=(
                "Initialise the output layer small (std 0.02 or zero), or scale the logits by "
                "1/sqrt(d_model) when the embedding is tied and initialised N(0, 1); put a final "
                "norm before the head. Large initial logits make early training spend its steps "
                "undoing overconfidence and raise loss spikes."
            ),
        )
    ]


def _n_targets(ctx: CheckContext) -> int:
    """Number of positions the default next-token loss would count on ``ctx.batch``."""
    t = ctx.targets()
    if ctx.causal and not ctx.targets_aligned():
        t = t[:, 1:]
    return int((t != -100).sum())  # host sync


def _output_layer(ctx: CheckContext) -> str | None:
    """Name of the output layer: the last layer (in ``named_modules`` order) whose output width
    is the logits' vocabulary (``nn.Linear.out_features`` or a Hugging Face ``Conv1D``'s
    ``nf``) and that ran in the forward. None when the logits come from a functional op (``x @ emb.weight.T``).

    Read from the structure, not from the last module to run: that one may be a loss module or
    the final norm of a model that computes its head functionally."""
    rec = ctx.recorded_forward()
    vocab = rec["logits"].shape[-1]
    ran = {r["name"] for r in rec["rows"]}
    found = None
    for name, m in ctx.model.named_modules():
        width = m.out_features if isinstance(m, nn.Linear) else getattr(m, "nf", None)
        if width == vocab and name in ran:
            found = name
    return found


@register_check("loss.init-mismatch", family="init", title="Initial loss far from ln(vocab)")
def loss_init_mismatch(ctx: CheckContext) -> list[Finding]:
    rec = ctx.recorded_forward()
    vocab = rec["logits"].shape[-1]
    torch.manual_seed(ctx.seed)
    with torch.no_grad():
        if ctx.loss_fn is not None:
            loss_t = ctx.loss()
        else:  # the loss ctx.loss() would compute, from the forward already made
            loss_t = rec["loss"] if rec["loss"] is not None else ctx.default_loss(rec["logits"])
        loss = float(loss_t)  # host sync
    expected = math.log(vocab)
    evidence = {"loss": loss, "ln_vocab": expected, "vocab": vocab}
    if not math.isfinite(loss):
        if not bool(torch.isfinite(rec["logits"].float().sum())):  # host sync
            raise SkipCheck("the logits are not finite (see numerics.nonfinite-forward)")
        if ctx.loss_fn is None and _n_targets(ctx) == 0:
            raise SkipCheck(
                "the batch has no valid target (see data.labels-all-ignored; a causal model "
                "needs sequences of >= 2 tokens)"
            )
        return [
            Finding(
                id="loss.init-mismatch",
                severity=Severity.ERROR,
                title="Initial loss is not finite",
                message=f"The loss at init is {loss}; expected about ln({vocab}) = {expected:.3f}.",
                evidence=evidence,
                recommendation=(
                    "See numerics.nonfinite-forward for where it first appears; a NaN loss with "
                    "finite logits means no valid target (data.labels-all-ignored)."
                ),
            )
        ]
    diff = loss - expected
    if diff > LOSS_EXCESS_MAX:
        n = _n_targets(ctx)
        summed = n > 1 and abs(loss / n - expected) < SUMMED_TOLERANCE * expected
        return [
            Finding(
                id="loss.init-mismatch",
                severity=Severity.WARNING,
                title="Initial loss far above ln(vocab)"
                + (": it looks summed, not averaged" if summed else ""),
                where=None if summed else _output_layer(ctx),
                message=(
                    f"The loss at init is {loss:.3f}, {diff:.3g} nats above ln({vocab}) = "
                    f"{expected:.3f}, the loss of a uniform guess."
                    + (
                        f" Divided by the {n} targets of the batch it is {loss / n:.3f} ~ "
                        "ln(vocab): the loss is a sum over tokens, so its scale (and the "
                        "gradient's) changes with batch size and length."
                        if summed
                        else ""
                    )
                ),
                evidence={
                    **evidence,
                    "excess": diff,
                    "limit": LOSS_EXCESS_MAX,
                    "n_targets": n,
                    "loss_per_target": loss / n if n else None,
                },
                recommendation=(
                    "Average the loss over tokens (F.cross_entropy(..., reduction='mean'), or "
                    "divide the sum by the number of non-ignored targets) so that learning "
                    "rates and clipping thresholds mean the same at any batch size and length."
                    if summed
                    else "Make the initial predictions near-uniform: small output-layer init "
                    "(see init.logit-scale). If the loss is a sum over tokens rather than a "
                    "mean, use reduction='mean' so that it does not scale with batch size and "
                    "length."
                ),
            )
        ]
    if -diff > LOSS_DEFICIT_MAX:
        return [
            Finding(
                id="loss.init-mismatch",
                severity=Severity.WARNING,
                title="Initial loss suspiciously below ln(vocab)",
                message=(
                    f"The loss at init is {loss:.3f}, {-diff:.3g} nats below ln({vocab}) = "
                    f"{expected:.3f}: an untrained model should not beat a uniform guess."
                ),
                evidence={**evidence, "deficit": -diff, "limit": LOSS_DEFICIT_MAX},
                recommendation=(
                    "The model probably sees its targets: for a decoder, check that labels are "
                    "shifted by one (predict token t+1 from tokens <= t) and the attention is "
                    "causal (see causal.leak); for a masked-LM, mask the input positions that "
                    "carry a target."
                ),
            )
        ]
    return []
