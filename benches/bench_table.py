"""Shared by the tables of benches/compare.sh and benches/cluster.sh: the result lines of
`middleman bench` (key=value words), medians with the spread of the rounds, and the
formats of the cells."""
import statistics


def read_results(path):
    """Each line of a results file as a dict of its key=value words."""
    for line in open(path):
        yield dict(p.split("=", 1) for p in line.split() if "=" in p)


def vals(runs, key):
    """The values of `key` that are numbers, over the runs."""
    out = []
    for r in runs:
        try:
            out.append(float(r[key]))
        except (KeyError, ValueError):
            pass
    return out


def med(runs, key):
    v = vals(runs, key)
    return statistics.median(v) if v else float("nan")


def fmt(v, unit):
    """`unit`: M (millions), Mk (millions, or thousands below 100k), us, B (kB), %
    (of a fraction), cores, rate (k above 1000), or a plain number."""
    if v != v:
        return "n/a"
    if unit == "M":
        return f"{v/1e6:.2f}M"
    if unit == "Mk":
        return f"{v/1e6:.2f}M" if v >= 1e5 else f"{v/1e3:.1f}k"
    if unit == "us":
        return f"{v:.0f} µs" if v < 1000 else f"{v/1000:.2f} ms"
    if unit == "B":
        return f"{v/1000:.1f} kB"
    if unit == "%":
        return f"{100*v:.1f}%"
    if unit == "cores":
        return f"{v:.2f}"
    if unit == "rate":
        return f"{v/1000:.2f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f}"


def cell(runs, key, unit):
    """median (min-max) over the rounds"""
    v = vals(runs, key)
    if not v:
        return "n/a"
    m = fmt(statistics.median(v), unit)
    return m if len(v) == 1 else f"{m} ({fmt(min(v), unit)}-{fmt(max(v), unit)})"


def held(runs):
    """Whether every fixed-load round achieved its offered rate."""
    h = [x.get("rate_held", "?") for x in runs]
    if not h:
        return "n/a"
    return "yes" if all(x == "yes" for x in h) else f"NO ({h.count('no')} of {len(h)})"
