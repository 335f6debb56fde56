"""CPU comparison: `diracnet bench` against ONNX Runtime (and PyTorch channels_last, OpenVINO).

Normally started by run.sh, which makes the venv and builds the binary:

    python bench.py --binary target/release/diracnet [--torch-python PY] [--openvino]
                    [--seconds 6] [--rounds 3] [--depth both] [--batches 1,8,32] [--threads 2]
                    [--conv-impl fast] [--bf16] [--out DIR]

--bf16 adds `diracnet --dtype bf16`, and PyTorch's and OpenVINO's bf16 where those run.

For every round, DiracNet depth and batch, every system runs back to back (A B A B ...),
each in a fresh process: ours is `diracnet bench --json`, the others are runner.py. Every process does `warmup` untimed passes (3 at batch <= 8, 1 above) and then
times passes for at least --seconds. A cell of the table is the median of the per-round
medians; peak RSS is the largest over the rounds, read for every system the same way
(ru_maxrss of the finished child from wait4, i.e. its VmHWM).

Before timing, once per depth, every system's logits on one batch of 2 are compared with
a float64 NumPy reference; a system that computes another network stops the run.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import dnet  # noqa: E402


def ensure_models(out, depths, seed):
    """make_models.ensure_models, in a child process. Building the models and their float64
    reference takes hundreds of MB, and Linux keeps a forked child's pre-exec high-water mark
    in its ru_maxrss: every system timed after would report at least this process's peak."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from make_models import ensure_models; "
            "print(json.dumps(ensure_models(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))))")
    r = subprocess.run([sys.executable, "-c", code, HERE, out, json.dumps(depths), str(seed)],
                       stdout=subprocess.PIPE, text=True, check=True)
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}

ORT, TORCH, TORCH_BF16, OV, OV_BF16 = "ort", "torch", "torch-bf16", "openvino", "openvino-bf16"
LABEL = {ORT: "ONNX Runtime", TORCH: "PyTorch channels_last", TORCH_BF16: "PyTorch channels_last, bf16",
         OV: "OpenVINO", OV_BF16: "OpenVINO, bf16"}
SHORT = {ORT: "ORT", TORCH: "PyTorch", TORCH_BF16: "PyTorch bf16", OV: "OpenVINO", OV_BF16: "OpenVINO bf16"}
# Max |d logit| against the f64 reference, relative to the largest |logit|: f32 systems must
# compute the same network (1e-3); bf16 ones are held to issue 13's bound (1.5 %).
TOLERANCE = {"f32": 1e-3, "bf16": 1.5e-2}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def busy_cpu_s():
    """CPU seconds all CPUs spent on anything but idle and iowait (steal included), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class Child:
    """A finished child: rc, stdout, stderr, peak RSS (MiB, from wait4), wall seconds, and the
    share of the machine's CPU time that went to other processes (or steal) meanwhile."""

    def __init__(self, cmd, env=None):
        with tempfile.TemporaryFile() as err:
            b0, t0 = busy_cpu_s(), time.perf_counter()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
            out = p.stdout.read()
            _, status, ru = os.wait4(p.pid, 0)
            self.wall = time.perf_counter() - t0
            b1 = busy_cpu_s()
            p.returncode = os.waitstatus_to_exitcode(status)
            p.stdout.close()
            err.seek(0)
            self.rc, self.out, self.err = p.returncode, out.decode(), err.read().decode(errors="replace")
        self.rss = ru.ru_maxrss / 1024.0
        own = ru.ru_utime + ru.ru_stime
        self.other_cpu = (None if b0 is None or b1 is None else
                          max(0.0, (b1 - b0 - own) / (self.wall * (os.cpu_count() or 1))))


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            return json.loads(line)
    raise ValueError("no JSON line in output")


class Ours:
    """`diracnet bench` with one conv implementation (None: the binary's default)."""

    def __init__(self, binary, conv_impl, threads, cache_dir, dtype="f32", cpu_isa=None):
        self.binary, self.conv_impl, self.threads, self.cache_dir = binary, conv_impl, threads, cache_dir
        self.dtype, self.cpu_isa = dtype, cpu_isa
        self.key = "ours" if conv_impl is None else f"ours-{conv_impl}"
        self.label = "ours" if conv_impl is None else f"ours ({conv_impl})"
        if dtype != "f32":
            self.key, self.label = f"{self.key}-{dtype}", f"ours ({conv_impl or 'default'}, {dtype})"
        if cpu_isa is not None:
            self.key, self.label = f"{self.key}-{cpu_isa}", f"{self.label[:-1]}, --cpu-isa {cpu_isa})"
        self.tolerance = TOLERANCE[dtype]
        self.flags = {sub: help_flags(binary, sub) for sub in ("bench", "classify")}
        if conv_impl is not None and "--conv-impl" not in self.flags["bench"]:
            sys.exit(f"{binary} bench has no --conv-impl; pass `--conv-impl default` to measure its built-in conv")
        if "--threads" not in self.flags["bench"]:
            log(f"warning: {binary} bench has no --threads; setting RAYON_NUM_THREADS={threads} instead")

    def _cmd_env(self, sub, model, extra):
        cmd = [self.binary, sub, "--model", model, "--device", "cpu", "--offline", "--cache-dir", self.cache_dir]
        env = dict(os.environ, DIRACNET_LOG="warn")
        if "--threads" in self.flags[sub]:
            cmd += ["--threads", str(self.threads)]
        else:
            env["RAYON_NUM_THREADS"] = str(self.threads)
        if "--dtype" in self.flags[sub]:
            cmd += ["--dtype", self.dtype]
        elif self.dtype != "f32":
            sys.exit(f"{self.binary} {sub} has no --dtype")
        if self.cpu_isa is not None:
            cmd += ["--cpu-isa", self.cpu_isa]
        if self.conv_impl is not None:
            if "--conv-impl" in self.flags[sub]:
                cmd += ["--conv-impl", self.conv_impl]
            else:
                env["DIRACNET_CONV_IMPL"] = self.conv_impl
        return cmd + extra, env

    def bench_cmd(self, paths, batch, seconds, warmup):
        return self._cmd_env("bench", paths["safetensors"], [
            "--batch", str(batch), "--seconds", str(seconds), "--warmup", str(warmup), "--json"])

    def check(self, paths):
        import numpy as np

        cmd, env = self._cmd_env("classify", paths["safetensors"],
                                 ["--json", "--logits", "--top-k", "1", paths["check_input"]])
        c = Child(cmd, env)
        if c.rc != 0:
            sys.exit(f"{' '.join(cmd)} failed ({c.rc}):\n{c.err[-3000:]}")
        got = np.array([r["logits"] for r in last_json_line(c.out)], dtype=np.float64)
        return np.load(paths["check_logits"]).astype(np.float64), got


class Python:
    def __init__(self, system, python, threads):
        self.key, self.label, self.python, self.threads = system, LABEL[system], python, threads
        self.dtype = "bf16" if system.endswith("bf16") else "f32"

    def _model(self, paths):
        return paths["safetensors"] if self.key.startswith("torch") else paths["onnx"]

    def bench_cmd(self, paths, batch, seconds, warmup):
        return [self.python, os.path.join(HERE, "runner.py"), self.key, "--model", self._model(paths),
                "--batch", str(batch), "--threads", str(self.threads), "--seconds", str(seconds),
                "--warmup", str(warmup)], None

    def check(self, paths):
        cmd = [self.python, os.path.join(HERE, "runner.py"), self.key, "--model", self._model(paths),
               "--threads", str(self.threads), "--check", paths["check_input"], paths["check_logits"],
               "--tolerance", str(TOLERANCE[self.dtype])]
        c = Child(cmd)
        try:
            return None, last_json_line(c.out)
        except ValueError:
            sys.exit(f"{' '.join(cmd)} failed ({c.rc}):\n{c.err[-3000:]}")


def help_flags(binary, sub):
    try:
        text = subprocess.run([binary, sub, "--help"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"cannot run `{binary} {sub} --help`: {e}")
    return {w.rstrip(",") for w in text.split() if w.startswith("--")}


def check_parity(systems, models):
    """Every system against the f64 NumPy reference (written by make_models) on a batch of 2."""
    import numpy as np

    lines = []
    for depth, paths in models.items():
        for s in systems:
            ref, got = s.check(paths)
            if isinstance(s, Ours):
                err = float(np.abs(got - ref).max())
                ok = (err <= s.tolerance * max(float(np.abs(ref).max()), 1.0)
                      and (got.argmax(1) == ref.argmax(1)).all())
            else:
                err, ok = got["max_abs_diff"], got["ok"]
            line = f"DN{depth} {s.label}: max |d logit| vs NumPy f64 = {err:.2e} {'ok' if ok else 'MISMATCH'}"
            log(line)
            lines.append(line)
            if not ok:
                sys.exit(f"{s.label} does not compute the same DiracNet-{depth} as the reference")
    return lines


def machine():
    info = {"python": platform.python_version(), "kernel": platform.release(), "nproc": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            cpu = f.read()
        fields = {}
        for line in cpu.splitlines():
            k, _, v = line.partition(":")
            fields.setdefault(k.strip(), v.strip())
        info["cpu"] = (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}"
                       f" model {fields.get('model', '?')})")
        flags = next((line for line in cpu.splitlines() if line.startswith("flags")), "")
        info["isa"] = "avx512f" if " avx512f" in flags else ("avx2" if " avx2" in flags else "other")
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def fmt_pct(x):
    return "?" if x is None else f"{100 * x:.0f} %"


def fmt(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def table(records, systems, depths, batches, threads):
    cells = {}
    for r in records:
        cells.setdefault((r["system"], r["depth"], r["batch"]), []).append(r)
    cols = [(d, b) for d in depths for b in batches]

    def ips(key, d, b):
        rs = cells.get((key, d, b))
        return statistics.median(r["img_per_s_median"] for r in rs) if rs else None

    def rss(key, d, b):
        rs = cells.get((key, d, b))
        return max(r["peak_rss_mib"] for r in rs) if rs else None

    head = "| system | " + " | ".join(f"DN{d} b{b}" for d, b in cols) + " |"
    out = [f"img/s (median of per-round medians; {threads} threads; f32 unless the row says bf16)", "",
           head, "|---|" + "---:|" * len(cols)]
    ours = [s for s in systems if isinstance(s, Ours)]
    others = [s for s in systems if not isinstance(s, Ours)]
    # Each of our rows against the other systems of its dtype, and against ONNX Runtime.
    pairs = [(o, s) for o in ours for s in others if s.dtype == o.dtype or s.key == ORT]
    for s in systems:
        out.append(f"| {s.label} | " + " | ".join(fmt(ips(s.key, d, b)) for d, b in cols) + " |")
    for o, s in pairs:
        vals = [ips(o.key, d, b) / ips(s.key, d, b) if ips(o.key, d, b) and ips(s.key, d, b) else None
                for d, b in cols]
        out.append(f"| {o.label}/{SHORT[s.key]} | " + " | ".join(fmt(v, 2) for v in vals) + " |")
    out += ["", "peak RSS, MiB (largest over the rounds; whole process)", "", head, "|---|" + "---:|" * len(cols)]
    for s in systems:
        out.append(f"| {s.label} | " + " | ".join(fmt(rss(s.key, d, b), 0) for d, b in cols) + " |")
    for o, s in pairs:
        vals = [rss(o.key, d, b) / rss(s.key, d, b) if rss(o.key, d, b) and rss(s.key, d, b) else None
                for d, b in cols]
        out.append(f"| {o.label}/{SHORT[s.key]} | " + " | ".join(fmt(v, 2) for v in vals) + " |")

    out.append("")
    spreads = []
    for (key, d, b), rs in cells.items():
        if len(rs) > 1:
            m = [r["img_per_s_median"] for r in rs]
            spreads.append(((max(m) - min(m)) / statistics.median(m), key, d, b))
    if spreads:
        w = max(spreads)
        out += [f"- Largest spread of per-round medians: {100 * w[0]:.0f} % ({w[1]}, DN{w[2]} b{w[3]})."]
    load = [(r["other_cpu"], r["system"], r["depth"], r["batch"]) for r in records if r.get("other_cpu") is not None]
    if load:
        w = max(load)
        out.append(f"- CPU time taken by other processes while a system ran: median "
                   f"{fmt_pct(statistics.median(x[0] for x in load))}, worst {fmt_pct(w[0])} "
                   f"({w[1]}, DN{w[2]} b{w[3]})" + (" -- the machine was not idle; the figures are not "
                                                    "trustworthy." if w[0] > 0.05 else "."))
    few = sorted({(r["system"], r["depth"], r["batch"]) for r in records if r["iterations"] < 5})
    if few:
        out.append("- Fewer than 5 timed iterations in a round: " +
                   ", ".join(f"{k} DN{d} b{b}" for k, d, b in few) + " (raise --seconds).")

    goals = []
    for o in (o for o in ours if o.dtype == "bf16"):
        # Issue 13's goals for bf16: DN18 at least as fast as PyTorch bf16 at batches 1 and 8
        # (then OpenVINO bf16), peak RSS no higher than theirs; faster than our own f32.
        for s in (s for s in others if s.dtype == "bf16"):
            for b in (b for b in (1, 8) if b in batches):
                x, y = ips(o.key, 18, b), ips(s.key, 18, b)
                if x and y:
                    goals.append(f"- Goal, {o.label}: DN18 b{b} ≥ {SHORT[s.key]}: "
                                 f"**{'met' if x >= y else 'not met'}** ({x / y:.2f}×).")
            worst = [(rss(o.key, d, b), rss(s.key, d, b), d, b) for d, b in cols]
            worst = [w for w in worst if w[0] and w[1]]
            if worst:
                over = [w for w in worst if w[0] > w[1]]
                goals.append(f"- Goal, {o.label}: peak RSS ≤ {SHORT[s.key]}'s: "
                             f"**{'not met' if over else 'met'}**"
                             + (" (" + ", ".join(f"DN{d} b{b}: {m:.0f} vs {t:.0f} MiB" for m, t, d, b in over) + ")"
                                if over else f" (at every point; largest {max(w[0] for w in worst):.0f} MiB)."))
        for f32 in (f for f in ours if f.dtype == "f32"):
            vals = [(ips(o.key, d, b), ips(f32.key, d, b), d, b) for d, b in cols]
            vals = [v for v in vals if v[0] and v[1]]
            if vals:
                slow = [v for v in vals if v[0] <= v[1]]
                goals.append(f"- Goal, {o.label} faster than {f32.label}: **{'not met' if slow else 'met'}** ("
                             + ", ".join(f"DN{d} b{b} {x / y:.2f}×" for x, y, d, b in vals) + ").")
    if goals:
        out += [""] + goals
    if 18 in depths and any(s.key == ORT for s in systems):
        out.append("")
        for o in (o for o in ours if o.dtype == "f32"):
            # The goal: DN18 ≥ 1.2× ORT at batch 8 and ≥ 1.0× at batch 1.
            for b, need in ((8, 1.2), (1, 1.0)):
                if b not in batches:
                    continue
                x, y = ips(o.key, 18, b), ips(ORT, 18, b)
                met = bool(x and y and x >= need * y)
                out.append(f"- Goal, {o.label}: DN18 b{b} ≥ {need}× ONNX Runtime: "
                           f"**{'met' if met else 'not met'}** ({fmt(x / y if x and y else None, 2)}×).")
            if 32 in batches:
                for d in depths:
                    mine, theirs = rss(o.key, d, 32), rss(ORT, d, 32)
                    if mine and theirs:
                        out.append(f"- Goal, {o.label}: DN{d} peak RSS at b32 ≤ ONNX Runtime's: "
                                   f"**{'met' if mine <= theirs else 'not met'}** "
                                   f"({mine:.0f} vs {theirs:.0f} MiB).")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True, help="the diracnet executable")
    ap.add_argument("--torch-python", help="a Python with torch; adds PyTorch channels_last")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per process (default 6)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--depth", default="both", choices=["18", "34", "both"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, help="untimed passes (default 3 at batch <= 8, else 1)")
    ap.add_argument("--conv-impl", default="fast",
                    help="comma list of `diracnet --conv-impl` values, one 'ours' row each; "
                         "`default` passes no flag (the binary's own choice; for binaries without the flag)")
    ap.add_argument("--bf16", action="store_true",
                    help="add a row for `diracnet --dtype bf16` (needs a CPU with AVX512-BF16), and "
                         "PyTorch's and OpenVINO's bf16 where those systems run")
    ap.add_argument("--bf16-conv-impl", default="fast",
                    help="comma list of `--conv-impl` values for the bf16 rows (default fast)")
    ap.add_argument("--bf16-cpu-isa", default="auto",
                    help="comma list of `--cpu-isa` values for the bf16 rows: `auto` (AMX where the "
                         "CPU has it), `avx512` (AVX512-BF16 alone); default auto")
    ap.add_argument("--openvino", action="store_true",
                    help="add OpenVINO (f32; with --bf16 also bf16) on the ONNX file (needs openvino in "
                         "this Python)")
    ap.add_argument("--no-ours", action="store_true", help="skip diracnet (reference systems only)")
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--skip-check", action="store_true", help="skip the logits check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=os.path.join(REPO, "bench", "out", "cpu", "models"))
    ap.add_argument("--out", help="results folder (default bench/out/cpu/<UTC time>)")
    a = ap.parse_args()

    depths = [18, 34] if a.depth == "both" else [int(a.depth)]
    batches = [int(b) for b in a.batches.split(",")]
    binary = shutil.which(a.binary) or a.binary
    if not os.access(binary, os.X_OK):
        sys.exit(f"not an executable: {a.binary}")
    binary = os.path.abspath(binary)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = a.out or os.path.join(REPO, "bench", "out", "cpu", stamp)
    cache = tempfile.mkdtemp(prefix="diracnet-bench-cache-")

    try:
        models = ensure_models(a.models, depths, a.seed)
        systems = [Ours(binary, None if c == "default" else c, a.threads, cache)
                   for c in a.conv_impl.split(",") if c and not a.no_ours]
        if a.bf16 and not a.no_ours:
            isas = [i for i in a.bf16_cpu_isa.split(",") if i]
            for conv in (c for c in a.bf16_conv_impl.split(",") if c):
                for isa in isas:
                    # `auto` alone keeps the row's old name (and its key in earlier results).
                    cpu_isa = None if isas == ["auto"] else isa
                    systems.append(Ours(binary, conv, a.threads, cache, dtype="bf16", cpu_isa=cpu_isa))
        if not a.no_ort:
            systems.append(Python(ORT, sys.executable, a.threads))
        if a.torch_python:
            systems.append(Python(TORCH, a.torch_python, a.threads))
            if a.bf16:
                systems.append(Python(TORCH_BF16, a.torch_python, a.threads))
        if a.openvino:
            systems.append(Python(OV, sys.executable, a.threads))
            if a.bf16:
                systems.append(Python(OV_BF16, sys.executable, a.threads))

        checks = [] if a.skip_check else check_parity(systems, models)
        version_line = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
        header = {"kind": "header", "time": stamp, "machine": machine(), "binary": binary,
                  "binary_version": version_line, "threads": a.threads,
                  "seconds": a.seconds, "rounds": a.rounds, "depths": depths, "batches": batches,
                  "systems": [s.key for s in systems], "checks": checks,
                  "gflop_per_image": {d: dnet.gflop_per_image(d) for d in depths}}
        os.makedirs(out_dir, exist_ok=True)
        results = os.path.join(out_dir, "results.jsonl")
        records = []
        with open(results, "w") as f:
            f.write(json.dumps(header) + "\n")
            for rnd in range(a.rounds):
                for d in depths:
                    for b in batches:
                        warmup = a.warmup if a.warmup is not None else (3 if b <= 8 else 1)
                        for s in systems:
                            cmd, env = s.bench_cmd(models[d], b, a.seconds, warmup)
                            c = Child(cmd, env)
                            if c.rc != 0:
                                sys.exit(f"{' '.join(cmd)} failed ({c.rc}):\n{c.err[-3000:]}")
                            r = last_json_line(c.out)
                            if r.get("threads") != a.threads:
                                sys.exit(f"{s.label} ran with threads={r.get('threads')}, wanted {a.threads}")
                            r.update(system=s.key, label=s.label, depth=d, round=rnd, warmup=warmup,
                                     self_peak_rss_mib=r.get("peak_rss_mib"), peak_rss_mib=round(c.rss, 1),
                                     wall_s=round(c.wall, 2), other_cpu=c.other_cpu, cmd=cmd)
                            if isinstance(s, Ours):
                                got = r.setdefault("conv_impl", s.conv_impl)
                                if s.conv_impl is not None and str(got).split(" ")[0] != s.conv_impl:
                                    sys.exit(f"{s.label} reports conv_impl={got}")
                                if r.get("dtype", "f32") != s.dtype:
                                    sys.exit(f"{s.label} reports dtype={r['dtype']}, wanted {s.dtype}")
                            records.append(r)
                            f.write(json.dumps(r) + "\n")
                            f.flush()
                            log(f"round {rnd + 1}/{a.rounds} DN{d} b{b} {s.label:>22}: "
                                f"{r['img_per_s_median']:7.2f} img/s, {r['iterations']:3d} it, "
                                f"{c.rss:6.0f} MiB, other load {fmt_pct(c.other_cpu)}")
        versions = sorted({r["version"] for r in records if r.get("version")})
        text = table(records, systems, depths, batches, a.threads)
        m = header["machine"]
        text = (f"CPU comparison, {stamp}: {m.get('cpu', '?')} ({m.get('nproc')} CPUs, {m.get('isa')}), "
                f"{a.rounds} rounds × ≥{a.seconds:g} s per point, git {m.get('git', '?')}; "
                f"{version_line}; " + ", ".join(versions) + "\n\n" + text + "\n")
        with open(os.path.join(out_dir, "table.md"), "w") as f:
            f.write(text)
        print(text)
        log(f"results: {results}\ntable:   {os.path.join(out_dir, 'table.md')}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
