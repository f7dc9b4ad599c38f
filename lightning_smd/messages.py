"""Every warning lightning_smd issues, in one place.

A warning is one or two sentences: what happened (with the numbers) and what to change. It ends with a
short code, ``[SMD020]``; the README's section *Warning codes* explains each code at length (the theory
behind it, the causes to rule out). :class:`SMDWarning` carries the code (``warning.code``), so a script
can filter one kind::

    warnings.filterwarnings("ignore", category=SMDWarning, message=r".*\\[SMD021\\]")

Nothing here imports torch or Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SMDWarning", "Message", "MESSAGES", "render", "shown_names"]


class SMDWarning(UserWarning):
    """Warnings of lightning_smd (filter them with ``warnings.filterwarnings(..., category=SMDWarning)``).
    ``code`` is the warning's code (``"SMD020"``), explained in the README's *Warning codes*."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Message:
    code: str
    #: a few words, the title of the code's entry in the README
    title: str
    #: ``str.format`` template of the sentence(s)
    template: str


_ALL = (
    # --- set-up (fit start) ----------------------------------------------------------------------
    Message(
        "SMD001",
        "no normalized weight",
        "SMD found no normalized (scale-invariant) weight in {model}{detail}. Nothing is measured (verdict "
        "'not_applicable'); if the model does normalize some weights, name them with include=['block.*.conv.weight'].",
    ),
    Message(
        "SMD002",
        "no weight decay",
        "{count} normalized weight(s) ({names}) are in param group {group} of optimizer {optimizer} with weight_decay=0, "
        "so they have no equilibrium: give that param group weight_decay > 0 (e.g. 5e-4 for SGD, 0.05-0.1 for AdamW) and "
        "exclude only norm affine parameters and biases from decay.",
    ),
    Message(
        "SMD038",
        "weight decay on gains and biases",
        "{count} gain(s) and bias(es) ({names}) are in param group {group} of optimizer {optimizer} with weight_decay={wd:g}. "
        "They are not scale-invariant: decay only shrinks them, and a shrinking normalization gain makes the layer after it "
        "learn as if its learning rate were raised. Keep them out of the decay: "
        "torch.optim.<Optimizer>(lightning_smd.param_groups(model, weight_decay={wd:g}), ...) decays the weights and not the "
        "gains and biases.",
    ),
    Message(
        "SMD039",
        "a parameter in several optimizers",
        "{count} parameter(s) ({names}) are in the param groups of more than one optimizer ({optimizers}): each step moves "
        "them twice, with two sets of settings, and no equilibrium of one optimizer describes them. Give each parameter "
        "to one optimizer.",
    ),
    Message(
        "SMD003",
        "run too short to be judged",
        "The run is planned for {planned} optimizer steps, but the slowest layer ({name}: relaxation time tau = {tau:.0f} "
        "steps for {settings}) can be judged only after {needed} steps of unchanged settings (4 relaxation times, and "
        "twice window={window}), so the verdict will be 'not_reached': train for at least {needed} steps, or raise "
        "lr*weight_decay to shorten tau.",
    ),
    Message(
        "SMD004",
        "optimizer without a rule",
        "No SMD rule is known for optimizer {optimizers}: its normalized weights are measured, but without a prediction "
        "their verdict is 'not_applicable'; register one with lightning_smd.analysis.theory.register(MyOptimizer, MyRule()).",
    ),
    Message(
        "SMD005",
        "normalized weights no optimizer updates",
        "{count} normalized weight(s) are not updated by any optimizer (or by parts of several), so they are not "
        "measured: {names}. Give them to one optimizer, or exclude them.",
    ),
    Message("SMD006", "detection could not analyse the model", "{error} Name the normalized weights with include=[...]."),
    Message("SMD007", "optimizer settings outside the theory", "{caveat}."),
    Message("SMD008", "unsupported strategy", "{detail}"),
    Message(
        "SMD009",
        "angular distance under sharding",
        "track_distance is not supported with sharded parameters yet: the angular distance is not measured.",
    ),
    # --- first batch: the numerical check ----------------------------------------------------------
    Message(
        "SMD010",
        "gradient not orthogonal (normalization eps)",
        "{name} was detected as scale-invariant (through {through}), but its gradient is not orthogonal to it: "
        "|cos(g, w)| = {cos:.1e} at {granularity} granularity (invariant weights give below {limit:.0e}). Likely the "
        "normalization's eps against small activations: the layer follows the prediction only approximately; "
        "exclude=['{name}'] if that matters.",
    ),
    Message(
        "SMD011",
        "gradient not orthogonal (another use of the weight)",
        "{name} was detected as scale-invariant (through {through}), but its gradient is not orthogonal to it: "
        "|cos(g, w)| = {cos:.1e} at {granularity} granularity (invariant weights give below {limit:.0e}). Something "
        "outside the analysed forward pass uses it (an explicit L2 penalty in the loss, a hook, a path around the "
        "normalization): fix the model, or pass exclude=['{name}'].",
    ),
    Message(
        "SMD012",
        "numerical check failed",
        "The numerical check of scale invariance failed ({error}); detection is structural only.",
    ),
    Message(
        "SMD013",
        "include pattern matches no parameter",
        "include pattern(s) {patterns} match no parameter name, so they add nothing to the tracked weights. {hint}. "
        "Patterns are globs (fnmatch, case-sensitive) over the full names of model.named_parameters().",
    ),
    Message(
        "SMD014",
        "exclude pattern matches no parameter",
        "exclude pattern(s) {patterns} match no parameter or tracked weight name, so they exclude nothing. {hint}. "
        "Patterns are globs (fnmatch, case-sensitive) over the full names of model.named_parameters().",
    ),
    Message(
        "SMD015",
        "included weight not scale-invariant",
        "{name} (named by include=) is not scale-invariant: its gradient is not orthogonal to it on the first batch, "
        "|cos(g, w)| = {cos:.2g} (invariant weights give below {limit:.0e}). The SMD prediction does not apply to it: it "
        "is measured and logged, but left out of the verdict (state 'no_prediction'). Remove it from include= unless "
        "a normalization absorbs its scale.",
    ),
    Message(
        "SMD016",
        "BatchNorm in eval mode",
        "{name} is not scale-invariant while training: |cos(g, w)| = {cos:.1e} on the first batch (invariant weights "
        "give below {limit:.0e}), and BatchNorm is in eval mode ({modules}): it normalizes with its running "
        "statistics, so the scale of the weight before it reaches the output and the SMD prediction does not hold. "
        "Keep BatchNorm in train mode while training (model.train(); a frozen-statistics fine-tune is outside the "
        "theory), or pass exclude=['{name}'].",
    ),
    Message(
        "SMD017",
        "unfrozen after fit start",
        "{count} weight(s) frozen when fit started were trained later ({names}): detection left them out as frozen, "
        "so they were not measured. Unfreeze them before fit starts, or name them with include=[...].",
    ),
    # --- during training ---------------------------------------------------------------------------
    Message(
        "SMD018",
        "schedule not read ahead",
        "The learning-rate schedule of optimizer {optimizer} cannot be read ahead ({reason}); its changes are judged as "
        "they come, each one restarting the settling clock.",
    ),
    Message(
        "SMD019",
        "no equilibrium before the schedule moves on",
        "{name} is forecast never to reach equilibrium in this schedule: it needs about {needed} steps to get there "
        "(relaxation time {tau:.0f} steps at the peak settings){decay}. {fix}",
    ),
    Message(
        "SMD036",
        "schedule too short to be judged",
        "The schedule of optimizer {optimizer} plans {planned:,} steps, but {layers} can be judged only after {needed:,} "
        "(4 norm relaxation times of {time_constant:.0f} steps, the fastest the plan reaches, at {settings}; and twice "
        "window={window}), so the verdict will be 'not_reached' whatever the gradients: train for at least {needed:,} "
        "steps (twice that leaves as long again to judge){weight_decay}.",
    ),
    Message(
        "SMD037",
        "a step down too late to come back from",
        "The schedule of optimizer {optimizer} steps the equilibrium down ×{drop:.2f} at step {step:,}, {remaining:,} steps "
        "before the end; even layers in equilibrium before it need about {needed:,} steps to come back into the band "
        "(norm time constant {time_constant:.0f} steps after it), so {layers} will end re-equilibrating and be judged "
        "'not_reached'. {fix}",
    ),
    Message(
        "SMD035",
        "fast start",
        "The angular update of {layers} started far above its equilibrium: up to {ratio:.1f}× the equilibrium value at "
        "the peak learning rate (the 20-step average; {name} at step {step}). Their weights start well inside their "
        "equilibrium norm, and the first steps turn them that many times faster than they will turn at equilibrium. "
        "{advice}",
    ),
    Message(
        "SMD028",
        "settings left the plan",
        "The settings left the schedule read at fit start ({why}): from here on the changes are judged as they come.",
    ),
    Message(
        "SMD029",
        "a planned decay too late to re-equilibrate",
        "The schedule's last decay comes too late for {layers}: the forecast has them still re-equilibrating when the "
        "run ends (Δ̂/Δ* {ratio:.2f} and rising), so they will be judged out of equilibrium. Decay earlier, or train "
        "longer after the decay.",
    ),
    Message(
        "SMD020",
        "vanishing gradient noise",
        "Vanishing gradient noise from step {step} ({layers}): {loss}the gradient statistic L fell from {peak:.3g} to "
        "{now:.3g} and the angular update to {ratio:.2f} of the prediction, so no equilibrium exists. Keep the gradient "
        "noise alive: more data or augmentation, label smoothing, or less weight decay late in training.",
    ),
    Message(
        "SMD048",
        "dead layers",
        "Dead from step {step} ({layers}): the gradient statistic L fell from {peak:.3g} to {now:.3g} {loss}, and the "
        "norm followed the pure weight-decay curve for a relaxation time: the loss no longer reaches these weights, and "
        "they have no equilibrium. Look for what cut them off: a gain or a residual branch decayed to zero, a block the "
        "task does not need, a ReLU that never fires, a frozen or detached path.",
    ),
    Message(
        "SMD049",
        "dead filters",
        "{count} filter(s) are dead at step {step} ({layers}): each stopped rotating and its norm follows the pure "
        "weight-decay curve, with its gradient 100x below its peak. Usually a ReLU that never fires after them or a "
        "channel nothing reads; per-layer counts are logged as smd/<name>/dead_filters and in the summary.",
    ),
    Message(
        "SMD021",
        "norm spike",
        "Norm spike at step {step} in {name}: the angular update jumped to {ratio:.1f} times the prediction after the "
        "layer had been in equilibrium (all spikes: summary['spikes']). A lower learning rate or weight decay, or "
        "gradient clipping, damps them.",
    ),
    Message(
        "SMD022",
        "schedule change too late",
        "The learning rate / weight decay changed at step {step} (predicted angular update {before:.3g} -> {after:.3g} "
        "rad/step): {name} needs about {expected:.0f} steps to re-equilibrate, but only {remaining} planned steps "
        "remain. Decay earlier, or train longer after the decay.",
    ),
    Message("SMD023", "stopping the run", "Stopping training (on_no_equilibrium='stop'): {reason}."),
    Message(
        "SMD024",
        "measurement failed",
        "SMD measurement of optimizer {index} ({optimizer}) failed and stopped: {error}. Training is unaffected; please "
        "report this with the model and optimizer.",
    ),
    Message(
        "SMD025",
        "training diverged",
        "Training diverged: {layers} became non-finite (NaN or inf) at optimizer step {step}. The "
        "verdict is 'diverged' and the gate fails; nothing after that step is measured. Lower the learning rate, add "
        "gradient clipping or a warm-up, or look for a NaN in the data or the loss.",
    ),
    Message(
        "SMD026",
        "non-finite loss",
        "The training loss was not finite ({loss}) in the log interval ending at step {step}, while the tracked "
        "weights are still finite. A skipped step of mixed-precision loss scaling can do this once; if it repeats, "
        "training is diverging.",
    ),
    Message(
        "SMD027",
        "gate stood down in a debug run",
        "The equilibrium gate (on_no_equilibrium={gate!r}) stood down: this is a debug run ({run}), too short to be "
        "judged by design. Its verdict '{verdict}' is in the summary, but does not fail the run.",
    ),
    # --- end of training ---------------------------------------------------------------------------
    Message(
        "SMD030",
        "steady but off the prediction",
        "{count} layer(s) are steady, but their angular update is off the SMD prediction by more than ±{tolerance:.0%} "
        "(steady Δ/Δ* [confidence interval]): {layers}. {counted} Likely causes: {causes}",
    ),
    Message(
        "SMD031",
        "steady far off the prediction",
        "{count} layer(s) are steady further than ±{max_deviation:.0%} from the SMD prediction: {layers}. That is "
        "another regime than SMD's equilibrium and does not count as one; check 'verification' in the summary and the "
        "gradient noise (see the code's entry in the README).",
    ),
    Message(
        "SMD032",
        "layers that never reached equilibrium",
        "{count} layer(s) never reached equilibrium while others did: {layers}. Check their relaxation times and "
        "'verification' in the summary.",
    ),
    Message(
        "SMD033",
        "ended while re-equilibrating",
        "Training ended while {count} layer(s) were still re-equilibrating after a change of the learning rate or weight "
        "decay: decay earlier, or train longer after the last decay.",
    ),
    Message("SMD034", "no equilibrium reached", "No equilibrium reached: {reason}"),
    # --- I/O ---------------------------------------------------------------------------------------
    Message(
        "SMD040",
        "a logger refused the metrics",
        "{logger} refused the SMD metrics ({error}); they are not logged there, training goes on.",
    ),
    Message(
        "SMD041",
        "a logger could not take the SMD extras",
        "Could not {what} of {logger} ({error}); the metrics are still logged.",
    ),
    Message("SMD042", "summary not written", "Could not write the SMD summary to {path}: {error}."),
    Message(
        "SMD047",
        "two runs in one log directory",
        "Another run ({other}) wrote its SMD summary to {path} while this one ran: two runs share one log directory. "
        "This run's summary is written to {target} instead, so that neither is lost; give each run its own log "
        "directory (a logger version, or default_root_dir).",
    ),
    Message(
        "SMD043",
        "checkpoint state does not fit",
        "The SMD state in the checkpoint does not fit this run ({error}); measuring from scratch.",
    ),
    Message("SMD044", "summary lost after an exception", "SMD could not write its summary after {exception}: {error}."),
    Message(
        "SMD045",
        "no heatmap without matplotlib",
        "matplotlib is not installed, so the SMD heatmap is not drawn for the loggers that take images (W&B, TensorBoard, "
        "MLflow; everything else is logged): pip install matplotlib, or pass log_heatmap=False.",
    ),
    Message(
        "SMD046",
        "W&B workspace not saved",
        "The W&B workspace was not saved ({why}); build and save it later with: lightning-smd wandb-workspace "
        "ENTITY/PROJECT --summary LOG_DIR --save.",
    ),
)

#: Every message by code.
MESSAGES: dict[str, Message] = {m.code: m for m in _ALL}
if len(MESSAGES) != len(_ALL):  # a code given twice would silently hide one of its messages
    raise RuntimeError(f"duplicate warning codes: {sorted({m.code for m in _ALL if sum(x.code == m.code for x in _ALL) > 1})}")


def render(code: str, **fields: object) -> str:
    """The warning text of ``code`` with its fields, ending with the code."""
    return f"{MESSAGES[code].template.format(**fields)} [{code}]"


def shown_names(names: list[str] | tuple[str, ...], first: int = 5) -> str:
    """At most ``first`` of ``names``, comma-separated, then how many more."""
    return ", ".join(names[:first]) + (f" and {len(names) - first} more" if len(names) > first else "")
