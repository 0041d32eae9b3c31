"""One pipeline run on a cache miss: reference, candidates (model passes, then engine candidates: build -> guard ->
time), selection, compile. Kept apart from :mod:`optimizers.pipeline` (cache, public API) so each file has one
job."""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimizers import accuracy, engines
from optimizers.accuracy import Family
from optimizers.cache import Cache, cache_key
from optimizers.device import DeviceInfo
from optimizers.modelinfo import ModelInfo
from optimizers.options import OptimizeOptions
from optimizers.passes import compile as compiling
from optimizers.passes.base import ModelPass, PassContext
from optimizers.reference import ReferenceSet, resize_batch
from optimizers.report import BeforeAfter, Report, Step
from optimizers.runtime import DeviceGuard, Feed, SessionSpec, run_checked
from optimizers.selection import select_fastest
from optimizers.timing import Benchmark, Latencies, Throughput

log = logging.getLogger("optiserve.optimizers")
Progress = Callable[[str], None]


@dataclass
class Candidate:
    """A model (with the session spec that runs it) that passed the guard and was timed. ``nodes``: where the
    guard's session placed its nodes, by provider."""

    name: str
    path: Path
    family: Family
    spec: SessionSpec
    latencies: Latencies
    artifact_key: str | None = None
    sparse_24: bool = False
    nodes: dict[str, int] = field(default_factory=dict)


@dataclass
class Outcome:
    """What the run chose (the model, how to run it, its precision family), plus the report."""

    model_path: Path
    artifact_key: str | None
    session: SessionSpec
    family: Family
    report: Report


def family_refusal(precision: str, family: Family) -> str | None:
    """Why ``precision`` rules a family out (None: allowed). auto allows all; a forced precision keeps its
    own family; fp32 (and none) apply no lossy step."""
    if precision in ("auto", family):
        return None
    if precision == "fp32":
        return "precision fp32: no lossy step is applied"
    return f"precision {precision} keeps only {precision} candidates"


class OptimizationRun:
    """State of one run; :meth:`execute` does the work."""

    def __init__(
        self,
        *,
        cache: Cache,
        device: DeviceInfo,
        passes: list[ModelPass[Any]],
        benchmark: Benchmark,
        model_path: Path,
        model_sha: str,
        info: ModelInfo,
        options: OptimizeOptions,
        reference: ReferenceSet,
        report: Report,
        progress: Progress,
        libraries: dict[str, str],
        guard: DeviceGuard,
        throughput: Throughput,
    ) -> None:
        self.cache, self.device, self.passes, self.benchmark, self.guard = cache, device, passes, benchmark, guard
        self.throughput = throughput
        self.model_path, self.model_sha, self.info, self.options = model_path, model_sha, info, options
        self.reference, self.report, self.progress, self.libraries = reference, report, progress, libraries
        self.batch_dim = options.max_batch_size > 0 and info.batch_dynamic
        self.batch = options.preferred_batch_size if self.batch_dim else 1
        self.feeds = self._timing_feeds()
        self.compile_config = compiling.configure(options, info, device.cores, cache.root, reference.batches[0])
        self.built: dict[str, tuple[str, Path]] = {}
        """Artifacts built in this run, by pass name: (cache key, path). Engine candidates run some of them."""
        report.timing = {
            "preferred_batch_size": self.batch,
            "batch_sizes": sorted(self.feeds),
            "budget_s": options.time_budget_s,
        }

    def _timing_feeds(self) -> dict[int, Feed]:
        first = self.reference.batches[0]
        if not self.batch_dim:
            return {1: first}
        return {size: resize_batch(first, size) for size in sorted({1, self.batch})}

    # ---- the run -------------------------------------------------------------------------------
    def execute(self) -> Outcome:
        """Reference outputs, baseline timing, every candidate, selection, compile."""
        base_spec = compiling.target_spec(self.compile_config)
        self.progress(f"optimize: reference ({self.reference.source}, {self.reference.count} inputs)")
        run = run_checked(self.model_path, base_spec, self.reference.batches, self.guard)
        self.reference.outputs = run.outputs
        self.progress("optimize: timing the original")
        baseline = self.benchmark("original", self.model_path, base_spec, self.feeds)
        original = Candidate("original", self.model_path, "fp32", base_spec, baseline, nodes=run.nodes)
        steps = [(p.name, functools.partial(self._evaluate, p, baseline)) for p in self.passes]
        steps += [
            (e.name, functools.partial(self._engine, e, baseline))
            for e in engines.candidates(self.options.target, self.cache.root)
        ]
        survivors = [candidate for name, evaluate in steps if (candidate := self._step(name, evaluate)) is not None]
        winner = self._select(original, survivors)
        session = self._compile(winner)
        self.report.selected = winner.name
        self.report.session_options = session.as_options()
        self.report.engine = engines.describe(session, winner.family, winner.nodes)
        return Outcome(winner.path, winner.artifact_key, session, winner.family, self.report)

    def _select(self, original: Candidate, survivors: list[Candidate]) -> Candidate:
        verdict = select_fastest(
            original.latencies, {c.name: c.latencies for c in survivors}, self.batch, self.options.min_gain
        )
        by_name = {step.name: step for step in self.report.steps}
        for candidate in survivors:
            step = by_name[candidate.name]
            step.status = "applied" if candidate.name == verdict.winner else "rejected"
            step.reason = verdict.reasons[candidate.name]
            log.info("step %s %s: %s", step.name, step.status, step.reason)
        winner = next((c for c in survivors if c.name == verdict.winner), None)
        if winner is None or not self._confirm(original, winner, by_name[winner.name]):
            return original
        return winner

    def _confirm(self, original: Candidate, winner: Candidate, step: Step) -> bool:
        """Time the original and the winner once more, back to back: a swap must survive a second look, so
        a load spike during the first round cannot make the served model slower than the original."""
        self.progress(f"optimize: confirming {winner.name}")
        base = self.benchmark("original", original.path, original.spec, self.feeds)
        again = self.benchmark(winner.name, winner.path, winner.spec, self.feeds)
        verdict = select_fastest(base, {winner.name: again}, self.batch, self.options.min_gain, note="")
        step.details["confirmation_ms"] = {"original": base.get(self.batch), winner.name: again.get(self.batch)}
        if verdict.winner is None:
            step.status = "rejected"
            step.reason = f"{step.reason}, but a second timing did not confirm: {verdict.reasons[winner.name]}"
            log.info("step %s rejected: %s", step.name, step.reason)
        return verdict.winner is not None

    # ---- candidates ------------------------------------------------------------------------------------------
    def _step(self, name: str, evaluate: Callable[[Step], Candidate | None]) -> Candidate | None:
        """One report step: ``evaluate`` builds, guards and times its candidate (None: skipped or rejected)."""
        step = Step(name=name)
        self.report.steps.append(step)
        started = time.monotonic()
        candidate = None
        try:
            candidate = evaluate(step)
        except Exception as exc:  # a broken pass or engine must not stop the model from loading
            step.status, step.reason = "rejected", f"failed: {type(exc).__name__}: {exc}"
            log.warning("step %s failed", name, exc_info=True)
        step.duration_s = round(time.monotonic() - started, 3)
        if candidate is None:
            log.info("step %s %s in %.2fs: %s", step.name, step.status, step.duration_s, step.reason)
        else:
            log.info("step %s passed the guard and was timed in %.2fs", step.name, step.duration_s)
        return candidate

    def _evaluate(self, model_pass: ModelPass[Any], baseline: Latencies, step: Step) -> Candidate | None:
        ctx = PassContext(self.device, self.options, self.info, self.reference.batches, self.guard)
        config = model_pass.configure(ctx)
        skip = family_refusal(self.options.precision, model_pass.family) or model_pass.skip_reason(ctx, config)
        if skip:
            step.reason = skip
            return None
        self.progress(f"optimize: {model_pass.name}")
        key, path, details = self._artifact(model_pass, config, ctx)
        self.built[model_pass.name] = (key, path)
        step.details = details
        sparse_24 = model_pass.family == "sparse" and getattr(config, "pattern", "") == "2:4"
        spec = compiling.target_spec(self.compile_config, model_pass.family, sparse_24)
        found = Candidate(model_pass.name, path, model_pass.family, spec, {}, key, sparse_24)
        return self._check(step, found, baseline)

    def _engine(self, engine: engines.EngineCandidate, baseline: Latencies, step: Step) -> Candidate | None:
        """An engine candidate: the original (or a pass's artifact) run by another engine at its precision."""
        skip = family_refusal(self.options.precision, engine.family) or engines.skip_reason(
            engine, self.device, self.built, self.options.execution_providers
        )
        if skip:
            step.reason = skip
            return None
        key, path = self.built.get(engine.source, (None, self.model_path))
        step.details = {"source": engine.source}
        return self._check(step, Candidate(engine.name, path, engine.family, engine.spec, {}, key), baseline)

    def _check(self, step: Step, candidate: Candidate, baseline: Latencies) -> Candidate | None:
        """Guard ``candidate`` on the reference set, then time it; fills the step (engine, sizes, accuracy,
        latencies). None when the guard rejects it."""
        step.size_bytes = BeforeAfter(before=self.info.size_bytes, after=candidate.path.stat().st_size)
        failures = self._guard(step, candidate)
        step.details["engine"] = engines.describe(candidate.spec, candidate.family, candidate.nodes)
        if failures:
            step.status, step.reason = "rejected", "accuracy: " + "; ".join(failures)
            return None
        self.progress(f"optimize: timing {candidate.name}")
        candidate.latencies = self.benchmark(candidate.name, candidate.path, candidate.spec, self.feeds)
        step.latency_ms = BeforeAfter(before=baseline.get(self.batch), after=candidate.latencies.get(self.batch))
        step.details["latency_ms_by_batch"] = {str(b): round(v, 4) for b, v in candidate.latencies.items()}
        return candidate

    def _artifact(self, model_pass: ModelPass[Any], config: Any, ctx: PassContext) -> tuple[str, Path, dict[str, Any]]:
        """The pass's output from the cache, or built now and stored."""
        key = cache_key(
            kind="artifact",
            model=self.model_sha,
            pass_name=model_pass.name,
            config=config.model_dump(mode="json"),
            device=self.device.fingerprint,
            libraries=self.libraries,
            reference=self.reference.digest if model_pass.uses_calibration else None,
        )
        hit = self.cache.get_artifact(key)
        if hit is not None:
            return key, hit[0], {**hit[1].get("details", {}), "artifact_cache_hit": True}
        work = self.cache.work_dir()
        try:
            output = work / "model.onnx"
            details = model_pass.apply(self.model_path, output, config, ctx)
            meta = {"pass": model_pass.name, "config": config.model_dump(mode="json"), "details": details}
            return key, self.cache.put_artifact(key, output, meta), {**details, "artifact_cache_hit": False}
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _guard(self, step: Step, candidate: Candidate) -> list[str]:
        """Run the candidate on the reference set and check its family's budgets; fills the step, and the
        candidate's ``nodes`` (where its session placed them)."""
        thresholds = accuracy.thresholds_for(candidate.family, self.options.accuracy)
        try:
            run = run_checked(candidate.path, candidate.spec, self.reference.batches, self.guard)
        except Exception as exc:  # onnxruntime refuses some converted graphs (missing kernels); OpenVINO fell back
            step.thresholds = thresholds
            return [f"does not run: {type(exc).__name__}: {exc}"]
        candidate.nodes = run.nodes
        comparison = accuracy.compare(self.reference.outputs, run.outputs)
        step.accuracy = {name: round(value, 6) for name, value in comparison.metrics.items()}
        step.thresholds = accuracy.applicable(thresholds, comparison) if not comparison.problems else thresholds
        return accuracy.violations(comparison, thresholds)

    # ---- compile -------------------------------------------------------------------------------
    def _compile(self, winner: Candidate) -> SessionSpec:
        step = Step(name="compile")
        self.report.steps.append(step)
        started = time.monotonic()
        try:
            return self._tune(step, winner)
        except Exception as exc:
            step.status, step.reason = "rejected", f"failed: {type(exc).__name__}: {exc}"
            log.warning("compile step failed", exc_info=True)
            return winner.spec
        finally:
            step.duration_s = round(time.monotonic() - started, 3)
            log.info("step compile %s in %.2fs: %s", step.status, step.duration_s, step.reason)

    def _tune(self, step: Step, winner: Candidate) -> SessionSpec:
        """The session config (threads, providers), then, where the host leaves them open, instances x threads."""
        spec = self._threads(step, winner)
        if self.compile_config.splits and spec.engine == "onnxruntime":
            spec = self._instances(step, winner, spec)
        return spec

    def _instances(self, step: Step, winner: Candidate, spec: SessionSpec) -> SessionSpec:
        """Time every N instances x T threads split under concurrent load (N sessions, each driven by its own
        thread with batches of the size the batcher forms under load); the best one replaces one instance on
        every core only when it is ``min_gain`` faster twice, the second time timed back to back with it."""
        self.progress("optimize: compile (instances x threads)")
        feed = self.feeds[self.batch]

        def rate(split: tuple[int, int]) -> float:
            count, threads = split
            trial = replace(spec, intra_op_threads=threads, instances=None)
            return self.throughput(f"compile:{count}x{threads}", winner.path, trial, feed, self.batch, count)

        splits = self.compile_config.splits
        rates = {split: rate(split) for split in splits}
        step.details["splits"] = [
            {"instances": n, "threads": t, "samples_per_s": round(value, 1)} for (n, t), value in rates.items()
        ]
        base, best = splits[0], max(splits[1:], key=lambda split: rates[split])
        needed = 1 + self.options.min_gain
        chosen = None
        if rates[base] > 0 and rates[best] >= rates[base] * needed:
            again = {base: rate(base), best: rate(best)}
            step.details["splits_confirmation"] = {f"{n}x{t}": round(v, 1) for (n, t), v in again.items()}
            chosen = best if again[best] >= again[base] * needed else None
        step.details["chosen"] = {"instances": chosen[0], "threads": chosen[1]} if chosen else None
        label = f"{best[0]} instances x {best[1]} threads"
        versus = f"{rates[best]:.1f} vs {rates[base]:.1f} samples/s for 1 instance x {base[1]} threads"
        if chosen is None:
            note = f"instances x threads: kept 1 instance ({label}: {versus}, needs {self.options.min_gain:.0%} more"
            note += ", not confirmed by a second timing)" if "splits_confirmation" in step.details else ")"
            step.reason = f"{step.reason}; {note}" if step.reason else note
            return spec
        ratio = rates[best] / rates[base]
        note = f"{label}: {versus} ({ratio:.2f}x)"
        step.reason = note if step.status != "applied" else f"{step.reason}; {note}"
        step.status = "applied"
        return replace(spec, intra_op_threads=best[1], instances=best[0])

    def _threads(self, step: Step, winner: Candidate) -> SessionSpec:
        """Race the session-config candidates against the winner's default spec."""
        size = winner.path.stat().st_size
        step.size_bytes = BeforeAfter(before=size, after=size)
        if winner.spec.engine == "openvino":
            step.reason = "OpenVINO keeps its own threads (the instances x threads split is the server's)"
            return winner.spec
        variants = compiling.candidates(self.compile_config, winner.family, winner.sparse_24)
        if not variants:
            step.reason = f"nothing to tune for target {self.options.target}"
            return winner.spec
        self.progress("optimize: compile")
        timed: dict[str, Latencies] = {}
        rejected: dict[str, str] = {}
        for variant in variants:
            if variant.family is not None and family_refusal(self.options.precision, variant.family):
                continue
            trial = Candidate(variant.label, winner.path, variant.family or winner.family, variant.spec, {})
            failures = self._guard(Step(name=variant.label), trial) if variant.family else []
            if failures:
                rejected[variant.label] = "; ".join(failures)
                continue
            timed[variant.label] = self.benchmark(f"compile:{variant.label}", winner.path, variant.spec, self.feeds)
        verdict = select_fastest(winner.latencies, timed, self.batch, self.options.min_gain, "the default session", "")
        chosen = next((v for v in variants if v.label == verdict.winner), None)
        step.details = {
            "candidates": {label: {str(b): round(v, 4) for b, v in lat.items()} for label, lat in timed.items()}
        }
        if rejected:
            step.details["rejected"] = rejected
        best = timed[verdict.winner] if verdict.winner else winner.latencies
        step.latency_ms = BeforeAfter(before=winner.latencies.get(self.batch), after=best.get(self.batch))
        if chosen is None:
            losers = "; ".join(f"{k}: {v}" for k, v in {**verdict.reasons, **rejected}.items())
            if winner.spec.as_options():  # GPU targets: the generated provider options are the compile result
                step.status = "applied"
                step.reason = f"{' > '.join(winner.spec.providers)} with generated provider options; variants: {losers}"
            else:
                step.status, step.reason = "rejected", f"no session config beat the default: {losers}"
            return winner.spec
        step.status, step.reason = "applied", f"{chosen.label}: {verdict.reasons[chosen.label]}"
        return chosen.spec
