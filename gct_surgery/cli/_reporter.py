"""Training events as people read them: rich progress bars on a terminal, plain lines
elsewhere, nothing under --json."""
from __future__ import annotations

from ._output import console, info, is_human, labelled, plural, short_number, warn


class Reporter:
    """Turns training events into rich progress bars (ETA, images/s) on a terminal and
    plain lines elsewhere; silent with --json."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.title = ""
        self.progress = None
        self.task_id = None
        self.stage = None
        self.bad_seen = 0

    def __call__(self, event: str, payload: dict) -> None:
        if self.quiet:
            return
        if "arm" in payload:  # a comparison: say which run the line is about
            self.title = f"{payload['arm']} (seed {payload['seed']}): "
        getattr(self, f"on_{event}", lambda p: None)(payload)

    def on_stage_start(self, p: dict) -> None:
        self.stage = p
        self._say(f"{self.title}stage {p['stage']} ({p['kind']}): {plural(p['epochs'], 'epoch')} x "
                  f"{plural(p['steps_per_epoch'], 'step')}, {p['trainable']:,} trainable parameters")
        if is_human():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            if self.progress is None:
                # The CLI's own console: a line printed anywhere while the bar is live
                # goes above it, never into it.
                self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                                         TimeRemainingColumn(), console=console)
                self.progress.start()
            total = p["epochs"] * p["steps_per_epoch"]
            done = p["epoch"] * p["steps_per_epoch"] + p["step"]
            self.task_id = self.progress.add_task(f"{self.title}{p['stage']}", total=total,
                                                  completed=done, speed="")

    def on_stage_end(self, p: dict) -> None:
        g = p.get("summary", {}).get("gates")
        if g:
            self._say(f"{self.title}after stage {p['stage']}: gates {g['state']} (max |gamma| "
                      f"{g['max_abs_gamma']:.3g}, max |beta| {g['max_abs_beta']:.3g}; "
                      f"{g['active_gates']} of {g['gates']} gates at 0.1 or more)")

    def on_step(self, p: dict) -> None:
        if self.progress is not None and self.task_id is not None:
            t = self.progress.tasks[self.task_id]
            speed = f"{t.speed * p['images']:.0f} img/s" if t.speed else ""
            self.progress.update(self.task_id, advance=1, speed=f"loss {p['loss']:.3f} {speed}")

    def on_epoch_end(self, p: dict) -> None:
        r = p["row"]
        metrics = " ".join(f"{k} {v:.4g}" for k, v in r.items()
                           if k not in ("epoch", "stage", "seconds", "images_per_s") and isinstance(v, float))
        speed = f", {r['seconds']:.1f} s, {r['images_per_s']} img/s" if r["seconds"] else ""
        self._say(f"{self.title}epoch {r['epoch']} ({r['stage']}): {metrics}{speed}"
                  f"{' *best*' if p['improved'] else ''}")

    def _say(self, line: str) -> None:
        if self.progress is not None:  # above the live bar, never inside it
            self.progress.console.print(line, highlight=False, markup=False)
        else:
            info(line)

    def on_machine(self, p: dict) -> None:
        self._say(f"{self.title}{p['line']}")

    def on_resumed(self, p: dict) -> None:
        self._say(f"{self.title}resumed at stage {p['stage_index'] + 1}, epoch {p['epoch'] + 1}, step {p['step']}")

    def on_interrupted(self, p: dict) -> None:
        self.close()
        whole = " (the whole comparison)" if "comparison" in p else ""
        warn(f"{self.title}{p.get('signal', 'SIGINT')}: stopped at stage {p['stage']}, epoch {p['epoch'] + 1}, "
             f"step {p['step']}; state saved. Continue with: gct-surgery finetune --resume "
             f"{p.get('comparison', p['run_dir'])}{whole}")

    def on_seed_done(self, p: dict) -> None:
        """A comparison's seed finished: its row, and under --seeds auto the look's verdict."""
        self.title = ""
        arms = ", ".join(f"{arm} {short_number(p[arm]) if p[arm] is not None else '-'}"
                         for arm in ("gct", "control"))
        line = f"seed {p['seed']} done: final {p['metric']} {arms}"
        if p.get("verdict"):
            line += f"; after {plural(p['seeds'], 'seed')}: {p['verdict']}"
        if p.get("reason"):
            line += f" ({p['reason']})"
        self._say(line)

    def on_arm_done(self, p: dict) -> None:
        self._say(f"{self.title}finished before; its result is read from {p['run_dir']}/result.json")

    def on_bad_file(self, p: dict) -> None:
        self.bad_seen += 1
        if self.bad_seen <= 5:  # the rest are counted in the report at the end
            self._warn(f"skipped unreadable image {p['path']}: {p['reason']}")

    def on_nonfinite_skipped(self, p: dict) -> None:
        self._warn(f"non-finite loss ({p['loss']}) at stage {p['stage']}, epoch {p['epoch'] + 1}, "
                   f"step {p['step']}: batch skipped ({p['skipped']} of {p['allowed']} allowed)")

    def _warn(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(labelled("warning", "yellow", message), soft_wrap=True)
        else:
            warn(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
