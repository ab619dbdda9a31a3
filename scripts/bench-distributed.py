#!/usr/bin/env python3
"""The measuring half of scripts/bench-distributed.sh (standard library only).

  snap OUT.json               a snapshot: CPU ticks per component from /proc,
                              pg_stat_database.xact_commit, pg_stat_statements
                              calls (when usable), es-rabbit's counters
  run RUSAGE.json CMD...      runs CMD and records its CPU time (wait4)
  quiet                       returns once es-rabbit's counters stand still
  phase ...                   prints a phase's figures per completed order
  summary RESULTS.tsv         the table, one column per binary
  raw ...                     prints the raw baseline's figures

Settings come from the environment (BENCH_*), set by the shell script.
"""

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
COMPONENTS = ["postgres", "rabbitmq", "orders", "smtp", "redis"]
NAMES = {
    "postgres": "PostgreSQL",
    "rabbitmq": "RabbitMQ",
    "orders": "orders processes",
    "smtp": "SMTP server",
    "redis": "Redis",
}
COUNTERS = ["published", "delivered", "acked", "acks_sent", "retried", "dead_lettered"]


def env(name, default=""):
    return os.environ.get(name, default)


# ---------------------------------------------------------------- /proc


def processes():
    """pid -> (comm, ppid, pgid, utime+stime+cutime+cstime in ticks)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        close = stat.rindex(")")
        comm = stat[stat.index("(") + 1 : close]
        # fields[0] is field 3 of proc(5) (state): field n is fields[n - 3].
        fields = stat[close + 2 :].split()
        ticks = sum(int(fields[n - 3]) for n in (14, 15, 16, 17))
        out[int(entry)] = (comm, int(fields[1]), int(fields[2]), ticks)
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def exe(pid):
    try:
        return os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return ""


def cpu_by_component():
    """Ticks per component, summed over each component's topmost processes
    and all their live descendants. Each process counts its own time and its
    reaped children's (cutime, cstime), so a child that exited (a PostgreSQL
    backend that disconnected) stays counted, in its parent."""
    procs = processes()
    children = {}
    for pid, (_, ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)

    def tree(root):
        total, stack = 0, [root]
        while stack:
            pid = stack.pop()
            total += procs[pid][3]
            stack.extend(children.get(pid, []))
        return total

    pgid = int(env("BENCH_PGID", "0") or 0)
    orders_exe = env("BENCH_ORDERS_EXE")

    def member(pid, component):
        if pid not in procs:
            return False
        comm, _, group, _ = procs[pid]
        if component == "postgres":
            return comm == "postgres"
        if component == "rabbitmq":
            # The broker's VM, not the VMs of CLI tools such as rabbitmqctl
            # (nor the epmd those start and stop).
            return comm == "beam.smp" and "rabbit boot" in cmdline(pid)
        if component == "redis":
            return comm.startswith("redis-server")
        if pgid == 0 or group != pgid:
            return False
        if component == "orders":
            return bool(orders_exe) and exe(pid) == orders_exe
        if component == "smtp":
            return comm.startswith("python") and "aiosmtpd" in cmdline(pid)
        return False

    cpu, found = {}, {}
    for component in COMPONENTS:
        roots = [
            pid
            for pid in procs
            if member(pid, component) and not member(procs[pid][1], component)
        ]
        found[component] = len(roots)
        cpu[component] = sum(tree(pid) for pid in roots)
    return cpu, found


# ---------------------------------------------------------------- PostgreSQL


def psql(sql):
    result = subprocess.run(
        ["psql", "-X", "-At", "-F", "\t", env("DATABASE_URL"), "-c", sql],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


XACTS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
STATEMENTS = """
SELECT queryid, sum(calls)::bigint, min(regexp_replace(left(query, 400), '\\s+', ' ', 'g'))
  FROM pg_stat_statements
 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
 GROUP BY queryid
"""


def statements():
    out = {}
    for line in psql(STATEMENTS).splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3:
            out[parts[0]] = [int(parts[1]), parts[2]]
    return out


# ---------------------------------------------------------------- metrics


def rabbit_counters():
    """es-rabbit's counters summed over every label and every process (each
    process's own /metrics; the gateway's merge covers only the processes it
    routes to)."""
    sums = {name: 0.0 for name in COUNTERS}
    for port in env("BENCH_PORTS").split():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError as error:
            raise SystemExit(f"metrics of 127.0.0.1:{port}: {error}")
        for line in text.splitlines():
            if not line.startswith("es_rabbit_"):
                continue
            name = line[len("es_rabbit_") : line.find("{") if "{" in line else line.find(" ")]
            name = name.removesuffix("_total")
            if name in sums:
                sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


# ---------------------------------------------------------------- commands


def snap(out):
    cpu, found = cpu_by_component()
    data = {
        "t": time.time(),
        "cpu": cpu,
        "found": found,
        "xacts": int(psql(XACTS).strip() or 0),
        "statements": statements() if env("BENCH_PGSS") == "1" else None,
        "rabbit": rabbit_counters() if env("BENCH_PORTS") else None,
    }
    with open(out, "w") as f:
        json.dump(data, f)


def run(out, argv):
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    with open(out, "w") as f:
        json.dump({"cpu_s": usage.ru_utime + usage.ru_stime, "end": time.time()}, f)
    sys.exit(os.waitstatus_to_exitcode(status) if status else 0)


def quiet():
    """Waits until es-rabbit's counters have not moved for a second (at most
    60 s): the work an order set off after it completed (emails, read
    models) is done."""
    last, still = None, 0
    for _ in range(120):
        now = rabbit_counters()
        still = still + 1 if now == last else 0
        if still >= 2:
            return
        last = now
        time.sleep(0.5)
    print("warning: the broker's counters were still moving after 60 s", file=sys.stderr)


def load(path):
    with open(path) as f:
        return json.load(f)


def delta(before, after):
    """after - before, per field; CPU in ms."""
    d = {
        "seconds": after["t"] - before["t"],
        "cpu": {
            c: (after["cpu"][c] - before["cpu"][c]) * 1000.0 / CLK_TCK for c in COMPONENTS
        },
        "xacts": after["xacts"] - before["xacts"],
        "statements": None,
        "rabbit": None,
    }
    if before.get("statements") is not None and after.get("statements") is not None:
        d["statements"] = {
            q: [calls - before["statements"].get(q, [0])[0], text]
            for q, (calls, text) in after["statements"].items()
            if calls != before["statements"].get(q, [0])[0]
        }
    if before.get("rabbit") is not None and after.get("rabbit") is not None:
        d["rabbit"] = {k: after["rabbit"][k] - before["rabbit"][k] for k in COUNTERS}
    return d


def scale_sub(d, other, factor):
    """d - factor * other, in place (fields both have)."""
    if other is None:
        return d
    for c in COMPONENTS:
        d["cpu"][c] -= factor * other["cpu"][c]
    d["xacts"] -= factor * other["xacts"]
    if d["statements"] is not None and other.get("statements") is not None:
        for q, (calls, text) in other["statements"].items():
            entry = d["statements"].setdefault(q, [0, text])
            entry[0] -= factor * calls
    if d["rabbit"] is not None and other.get("rabbit") is not None:
        for k in COUNTERS:
            d["rabbit"][k] -= factor * other["rabbit"][k]
    return d


def parse_load_report(path):
    """The figures orders-load printed."""
    report = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            words = value.split()
            if key == "orders":
                report["placed"] = int(words[0])
                report["completed"] = int(words[2])
                report["cancelled"] = int(words[4])
                report["failed"] = int(words[6])
            elif key == "completed/s":
                report["rate"] = float(words[0])
            elif key.startswith("latency"):
                for name, number in zip(words[::2], words[1::2]):
                    report[name] = float(number)
    return report


def short_sql(text, width=150):
    """A statement on one line, a long select list cut to "..." so that the
    table it reads shows."""
    upper = text.upper()
    cut = upper.find(" FROM ")
    if upper.startswith("SELECT ") and cut > 50:
        text = "SELECT ..." + text[cut:]
    return text[:width]


def fmt(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}f}"


def phase(args):
    """phase NAME KIND BEFORE AFTER LOAD_REPORT RUSAGE [SETUP_DELTA] [IDLE_DELTA]

    Prints the phase's figures per completed order and appends them to
    $BENCH_RESULTS. KIND: idle (writes its delta to $BENCH_DELTA_OUT), setup
    (the same), closed (everything), open (latency and the totals)."""
    name, kind, before, after, report_path, rusage_path = args[:6]
    setup = load(args[6]) if len(args) > 6 and args[6] else None
    idle = load(args[7]) if len(args) > 7 and args[7] else None
    before, after = load(before), load(after)
    d = delta(before, after)
    for c in COMPONENTS:
        if after["found"][c] != before["found"][c]:
            print(f"  warning: {NAMES[c]}: {before['found'][c]} process trees before, "
                  f"{after['found'][c]} after; its figure is unreliable")
    rusage = load(rusage_path) if rusage_path else None
    # The background work of an idle deployment (gauges, relays' polls) in
    # the wait after the load is not the orders': taken off at the idle rate.
    settle = after["t"] - rusage["end"] if rusage else d["seconds"]
    if idle is not None:
        scale_sub(d, idle, max(settle, 0.0) / idle["seconds"])
    if kind in ("idle", "setup"):
        with open(env("BENCH_DELTA_OUT"), "w") as f:
            json.dump(d, f)
        if kind == "idle":
            cpu = "  ".join(f"{NAMES[c]} {d['cpu'][c] / d['seconds']:.1f}" for c in COMPONENTS)
            print(f"  idle deployment, per second: {d['xacts'] / d['seconds']:.1f} PostgreSQL "
                  f"transactions; CPU ms: {cpu}")
        else:
            print(f"  setup of the load generator's products: {d['xacts']:.0f} transactions, "
                  f"{sum(d['cpu'].values()):.0f} ms CPU (taken off every phase)")
        return
    scale_sub(d, setup, 1.0)
    report = parse_load_report(report_path)
    completed = report.get("completed", 0)
    results = []

    def record(key, value):
        results.append((key, value))

    record("completed/s", report.get("rate"))
    for p in ("p50", "p95", "p99"):
        record(f"latency {p} ms", report.get(p))
    if report.get("failed") or report.get("cancelled"):
        print(f"  warning: {report.get('failed')} failed, {report.get('cancelled')} cancelled")
    if completed == 0:
        print("  no order completed: no figures per order")
    else:
        per = 1.0 / completed
        cpu = {c: d["cpu"][c] * per for c in COMPONENTS}
        total = sum(cpu[c] for c in COMPONENTS)
        without_smtp = total - cpu["smtp"]
        load_ms = rusage["cpu_s"] * 1000.0 * per if rusage else None
        xacts = d["xacts"] * per
        stmts = (
            sum(calls for calls, _ in d["statements"].values()) * per
            if d["statements"] is not None
            else None
        )
        rabbit = {k: v * per for k, v in d["rabbit"].items()} if d["rabbit"] else None
        if kind == "closed":
            print(f"  per completed order ({completed}; the products' setup and the idle "
                  f"background after the load taken off):")
            print("    CPU ms:  " + "  ".join(
                f"{NAMES[c]} {cpu[c]:.2f}" + ("" if after["found"][c] else " (not found)")
                for c in COMPONENTS))
            print(f"             total {total:.2f}, without the SMTP server {without_smtp:.2f}"
                  f"  (load generator {fmt(load_ms, 2)}, not in the total)")
            print(f"    PostgreSQL: {xacts:.1f} transactions" + (
                f", {stmts:.1f} statements" if stmts is not None else
                "; statements: pg_stat_statements unavailable"
                + (f" ({env('BENCH_PGSS_WHY')})" if env("BENCH_PGSS_WHY") else "")))
            if d["statements"]:
                top = sorted(d["statements"].values(), key=lambda e: -e[0])[:10]
                print("    top statements by calls per order:")
                for calls, text in top:
                    print(f"      {calls * per:7.2f}  {short_sql(text)}")
            if rabbit is not None:
                print(f"    broker: {rabbit['published']:.2f} publishes, "
                      f"{rabbit['delivered']:.2f} deliveries (acked {rabbit['acked']:.2f} "
                      f"in {rabbit['acks_sent']:.2f} acks, "
                      f"retried {rabbit['retried']:.2f}, dead-lettered "
                      f"{rabbit['dead_lettered']:.2f})")
        else:
            print(f"  {completed} completed, {report.get('rate', 0):.0f}/s; latency ms p50 "
                  f"{fmt(report.get('p50'), 2)} p95 {fmt(report.get('p95'), 2)} p99 "
                  f"{fmt(report.get('p99'), 2)}; per order: CPU {total:.2f} ms "
                  f"({without_smtp:.2f} without SMTP), {xacts:.1f} PostgreSQL transactions"
                  + (f", {rabbit['published']:.1f} publishes" if rabbit else ""))
        # The summary has every figure of the closed loop, the totals of the
        # open loops.
        if kind == "closed":
            for c in COMPONENTS:
                record(f"CPU ms {NAMES[c]}", cpu[c])
        record("CPU ms total", total)
        record("CPU ms total without SMTP", without_smtp)
        if kind == "closed":
            record("CPU ms load generator", load_ms)
        record("PostgreSQL transactions", xacts)
        if kind == "closed":
            record("PostgreSQL statements", stmts)
            if rabbit:
                record("broker publishes", rabbit["published"])
                record("broker deliveries", rabbit["delivered"])
                record("broker acks sent", rabbit["acks_sent"])
    with open(env("BENCH_RESULTS"), "a") as f:
        for key, value in results:
            if value is not None:
                f.write(f"{env('BENCH_LABEL')}\t{env('BENCH_ROUND')}\t{name}: {key}\t{value}\n")


def raw(args):
    """raw BEFORE AFTER OUTPUT RUSAGE: the raw baseline's figures."""
    before, after, output, rusage = load(args[0]), load(args[1]), args[2], load(args[3])
    d = delta(before, after)
    rate, completed = None, 0
    with open(output) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "orders/s":
                rate = float(value.split()[0])
            elif key == "orders":
                completed = int(value.split()[0])
    if completed:
        per = 1.0 / completed
        print(f"  per order: CPU ms PostgreSQL {d['cpu']['postgres'] * per:.2f}, RabbitMQ "
              f"{d['cpu']['rabbitmq'] * per:.2f}, the raw client {rusage['cpu_s'] * 1000 * per:.2f}"
              f"; {d['xacts'] * per:.1f} PostgreSQL transactions")
    with open(env("BENCH_RESULTS"), "a") as f:
        if rate is not None:
            f.write(f"raw\t{env('BENCH_ROUND')}\traw orders/s\t{rate}\n")


def summary(path):
    """The median of every figure per binary, one column each, and the
    closed loop's throughput as a ratio to the raw baseline."""
    values, labels, keys = {}, [], []
    with open(path) as f:
        for line in f:
            label, _, key, value = line.rstrip("\n").split("\t")
            if label == "raw":
                values.setdefault(("raw", key), []).append(float(value))
                continue
            if label not in labels:
                labels.append(label)
            if key not in keys:
                keys.append(key)
            values.setdefault((label, key), []).append(float(value))
    if not labels:
        return
    raw_rate = values.get(("raw", "raw orders/s"))
    width = max(len(k) for k in keys + ["ratio to the raw baseline"]) + 2
    rounds = max(len(v) for (label, _), v in values.items() if label != "raw")
    print(f"{'':{width}}" + "".join(f"{label:>14}" for label in labels)
          + ("   (medians of %d rounds)" % rounds if rounds > 1 else ""))
    for key in keys:
        cells = []
        for label in labels:
            v = values.get((label, key))
            cells.append(f"{statistics.median(v):14.2f}" if v else f"{'-':>14}")
        print(f"{key:{width}}" + "".join(cells))
    if raw_rate:
        raw_median = statistics.median(raw_rate)
        print(f"{'raw baseline orders/s':{width}}" + "".join(
            f"{raw_median:14.0f}" for _ in labels))
        cells = []
        for label in labels:
            v = values.get((label, "closed loop: completed/s"))
            cells.append(f"{statistics.median(v) / raw_median:14.3f}" if v else f"{'-':>14}")
        print(f"{'ratio to the raw baseline':{width}}" + "".join(cells))


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "snap":
        snap(args[0])
    elif command == "run":
        run(args[0], args[1:])
    elif command == "quiet":
        quiet()
    elif command == "phase":
        phase(args)
    elif command == "raw":
        raw(args)
    elif command == "summary":
        summary(args[0])
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
