"""Hostile inbox entries generated from a seed: the bytes, names, sizes, file types and links anyone
could drop into batchd's inbox, and what batchd must make of them.

``tests/test_fuzz_daemon.py`` drops a few hundred into a real daemon; ``bench/fuzz.py`` drops ten
thousand and more into a running one. Both check the same outcome (:func:`check_outcome`):

- the daemon never stops (no crash, no exit but the one asked for);
- nothing is lost: every entry with a manifest's name (``*.toml``/``*.json``, any case, not a
  dotfile or temp name) ends in the outbox, as a job or rejected with a reason;
- the well-formed manifests among them succeed: the hostile ones do not stop the others;
- every rejection message is bounded;
- nothing outside the inbox is read: a ``bait/`` folder beside it, which symlinks, hard links and
  input paths point into, is never opened (an audit hook in the daemon's interpreter records every
  ``open``: see :func:`audit_environment`).
"""

from __future__ import annotations

import json
import os
import random
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from batchd.daemon.intake import readable_name
from batchd.inbox import is_temp_name
from batchd.manifest import MANIFEST_SUFFIXES

#: A rejection's whole error (message, reason, field, file) longer than this fails the check: message and
#: reason are each cut at ``[limits] error_chars``.
MESSAGE_BOUND = 6000
#: ``[limits] error_chars`` (the default): a rejection's message is cut there, then "… (N characters in all)".
ERROR_CHARS = 2000
MESSAGE_CAP = ERROR_CHARS + 40

#: What the well-formed entries ask for; the emulator answers them.
VALID_TASKS = ('task = "sentiment"\ntexts = ["Fine {n}.", "Bad {n}."]\n',
               'task = "translate"\ntexts = ["Hello {n}."]\nlanguages = ["French"]\n')

_FIELDS = ["task", "texts", "items", "input", "model", "temperature", "languages", "variations", "prompt",
           "id_column", "text_column", "max_output_tokens", "system_instruction", "delimiter", "unknown"]
_TASKS = ["sentiment", "translate", "variations", "summarize", "nosuchtask", "", "SENTIMENT"]


@dataclass(frozen=True)
class Entry:
    """One generated inbox entry."""

    kind: str
    name: bytes           # its file name in the inbox
    accounted: bool       # a manifest's name: it must end in the outbox
    valid: bool = False   # well-formed: it must succeed


def is_manifest_name(name: bytes) -> bool:
    """Whether batchd takes an entry of this name for a manifest (its suffix, any case; not a temp name)."""
    text = os.fsdecode(name)
    return text.lower().endswith(MANIFEST_SUFFIXES) and not is_temp_name(text)


class Generator:
    """Writes hostile entries into ``inbox`` (their input files too); ``bait`` is the folder beside it
    they point at and must never be read."""

    def __init__(self, seed: int, inbox: Path, bait: Path) -> None:
        self.rng = random.Random(seed)
        self.inbox, self.bait = Path(inbox), Path(bait)
        self.bait.mkdir(exist_ok=True)
        (self.bait / "secret.toml").write_text(VALID_TASKS[0].format(n="bait"))
        (self.bait / "secret.csv").write_text("id,text\n1,the bait was read\n")
        self.count = 0
        self._kinds = [(self._valid, 8), (self._mutated, 22), (self._grammar, 22), (self._random_bytes, 8),
                       (self._deep, 4), (self._big_number, 3), (self._special, 10), (self._input, 15),
                       (self._odd_name, 7), (self._ignored, 1), (self._amplified, 1)]
        self._weights = [weight for _, weight in self._kinds]

    def entry(self) -> Entry:
        """Write the next entry and return what it is."""
        self.count += 1
        make = self.rng.choices([make for make, _ in self._kinds], self._weights)[0]
        return make(f"f{self.count:06d}")

    # -- writing ---------------------------------------------------------------------------------------

    def _write(self, name: bytes, data: bytes, *, in_place: bool = False) -> None:
        target = os.path.join(os.fsencode(self.inbox), name)
        if in_place:  # written straight into the inbox, as a careless producer does
            with open(target, "wb") as file:
                file.write(data)
            return
        temporary = os.path.join(os.fsencode(self.inbox), b"." + name[:200] + b".part")
        with open(temporary, "wb") as file:
            file.write(data)
        os.rename(temporary, target)

    def _manifest(self, stem: str, kind: str, data: bytes, suffix: str | None = None, **flags) -> Entry:
        suffix = suffix or self.rng.choice([".toml", ".json"])
        name = f"{stem}{suffix}".encode()
        self._write(name, data, in_place=self.rng.random() < 0.2)
        return Entry(kind, name, is_manifest_name(name), **flags)

    # -- kinds -----------------------------------------------------------------------------------------

    def _valid(self, stem: str) -> Entry:
        text = self.rng.choice(VALID_TASKS).format(n=stem)
        return self._manifest(stem, "valid", text.encode(), ".toml", valid=True)

    def _mutated(self, stem: str) -> Entry:
        suffix = self.rng.choice([".toml", ".json"])
        text = self.rng.choice(VALID_TASKS).format(n=stem)
        if suffix == ".json":
            import tomllib
            text = json.dumps(tomllib.loads(text))
        data = bytearray(text.encode())
        for _ in range(self.rng.randint(1, 6)):
            at = self.rng.randrange(len(data) + 1)
            how = self.rng.random()
            if how < 0.3 and data:
                data[min(at, len(data) - 1)] = self.rng.randrange(256)
            elif how < 0.6:
                data[at:at] = self.rng.choice([b"\x00", b"\xff\xfe", b"\\ud800", b"[", b"{", b"\"", b"=", b"\n",
                                               b"1e999", b"NaN", b"\xed\xa0\x80", b"]]]]", b"'''"])
            elif how < 0.8:
                del data[at:at + self.rng.randint(1, 8)]
            else:
                piece = data[at:at + self.rng.randint(1, 20)]
                data[at:at] = piece * self.rng.randint(2, 50)
        return self._manifest(stem, "mutated", bytes(data), suffix)

    def _value(self, depth: int = 0):
        rng = self.rng
        roll = rng.random()
        if depth < 4 and roll < 0.15:
            return [self._value(depth + 1) for _ in range(rng.randint(0, 4))]
        if depth < 4 and roll < 0.25:
            return {rng.choice(_FIELDS): self._value(depth + 1) for _ in range(rng.randint(0, 3))}
        return rng.choice([
            None, True, 0, -1, 2**63, 10**40, 1e308, float("nan"), float("inf"), -0.0, "", "x" * rng.randint(1, 5000),
            "\ud800", "a\x00b", "../bait/secret.csv", "/etc/passwd", "~root/x.csv", "é" * 300, "\u202e\u2028",
            "gemini-2.5-flash", "models/../../x", rng.choice(_TASKS), "%s%n{0}", "$(id)", "'; DROP TABLE jobs; --",
        ])

    def _grammar(self, stem: str) -> Entry:
        document = {"task": self.rng.choice(_TASKS)} if self.rng.random() < 0.8 else {}
        for _ in range(self.rng.randint(0, 6)):
            document[self.rng.choice(_FIELDS)] = self._value()
        if self.rng.random() < 0.5:
            data = json.dumps(document, allow_nan=True).encode()  # ASCII escapes: lone surrogates too
            return self._manifest(stem, "grammar", data, ".json")
        lines = []
        for key, value in document.items():
            lines.append(f"{key} = {json.dumps(value, allow_nan=True)}")  # JSON is mostly TOML; the rest is not
        return self._manifest(stem, "grammar", "\n".join(lines).encode("utf-8", "surrogatepass"), ".toml")

    def _random_bytes(self, stem: str) -> Entry:
        return self._manifest(stem, "bytes", self.rng.randbytes(self.rng.randint(0, 3000)))

    def _deep(self, stem: str) -> Entry:
        depth = self.rng.choice([65, 1000, 10_000, 100_000])
        if self.rng.random() < 0.5:
            data = ('{"task": "sentiment", "texts": ' + "[" * depth + "]" * depth + "}").encode()
            return self._manifest(stem, "deep", data, ".json")
        data = ('task = "sentiment"\ntexts = ' + "[" * depth + "]" * depth + "\n").encode()
        return self._manifest(stem, "deep", data, ".toml")

    def _amplified(self, stem: str) -> Entry:
        """Small on disk, large once parsed: 210,000 empty tables (over [limits] values) in 630 KB."""
        if self.rng.random() < 0.5:
            data = '{"task": "sentiment", "texts": [' + ",".join(["{}"] * 210_000) + "]}"
            return self._manifest(stem, "amplified", data.encode(), ".json")
        data = 'task = "sentiment"\ntexts = [' + ",".join(["{}"] * 210_000) + "]\n"
        return self._manifest(stem, "amplified", data.encode(), ".toml")

    def _big_number(self, stem: str) -> Entry:
        digits = "9" * self.rng.choice([20, 4301, 100_000])
        return self._manifest(stem, "big-number", f'task = "translate"\nmax_output_tokens = {digits}\n'
                                                  f'texts = ["a"]\nlanguages = ["French"]\n'.encode(), ".toml")

    def _special(self, stem: str) -> Entry:
        inbox = self.inbox
        what = self.rng.choice(["symlink", "symlink-dir", "dangling", "fifo", "directory", "hard-link", "empty"])
        if what == "empty" and self.rng.random() < 0.1:
            what = "oversize"  # rarely: each is 5 MB, moved whole into the outbox
        name = f"{stem}.toml".encode()
        path = inbox / name.decode()
        if what == "symlink":
            path.symlink_to(self.bait / "secret.toml")
        elif what == "symlink-dir":
            path.symlink_to(self.bait)
        elif what == "dangling":
            path.symlink_to(self.bait / "nothing-here.toml")
        elif what == "fifo":
            os.mkfifo(path)
        elif what == "directory":
            path.mkdir()
            (path / "inner.toml").write_text(VALID_TASKS[0].format(n=stem))
        elif what == "hard-link":
            os.link(self.bait / "secret.toml", path)
        elif what == "empty":
            path.write_bytes(b"")
        else:  # over the manifest size limit: rejected unread past it
            with open(path, "wb") as file:
                file.write(b'task = "sentiment"\ntexts = ["' + b"a" * (5 * 2**20) + b'"]\n')
        return Entry(f"special-{what}", name, True)

    def _input(self, stem: str) -> Entry:
        inbox = self.inbox
        what = self.rng.choice(["parent", "absolute", "symlink", "hard-link", "deep-jsonl", "wide-csv", "missing",
                                "nul", "long-name", "home", "bad-rows", "good-csv", "wide-row", "values-line"])
        reference = f"{stem}.csv"
        if what == "parent":
            reference = "../bait/secret.csv"
        elif what == "absolute":
            reference = str(self.bait / "secret.csv")
        elif what == "symlink":
            (inbox / reference).symlink_to(self.bait / "secret.csv")
        elif what == "hard-link":
            os.link(self.bait / "secret.csv", inbox / reference)
        elif what == "deep-jsonl":
            reference = f"{stem}.jsonl"
            (inbox / reference).write_text('{"id": "1", "text": "ok"}\n' + "[" * 50_000 + "]" * 50_000 + "\n")
        elif what == "wide-csv":
            (inbox / reference).write_text(",".join(f"c{n}" for n in range(50_000)) + "\n" + "x\n")
        elif what == "wide-row":
            (inbox / reference).write_text("id,text\n1,ok\n2," + "ab," * 20_000 + "\n")
        elif what == "values-line":
            reference = f"{stem}.jsonl"
            (inbox / reference).write_text('{"id": "1", "text": "ok", "x": [' + ",".join(["{}"] * 210_000) + "]}\n")
        elif what == "missing":
            reference = f"{stem}-absent.csv"
        elif what == "nul":
            reference = f"{stem}\x00.csv"
        elif what == "long-name":
            reference = "n" * 300 + ".csv"
        elif what == "home":
            reference = "~nosuchuser/x.csv"
        elif what == "bad-rows":
            (inbox / reference).write_bytes(b"id,text\n1,ok\n1,again\n2,\xff\xfe\n\"unterminated\n")
        else:
            (inbox / reference).write_text(f"id,text\n1,Fine {stem}\n2,Bad {stem}\n")
        manifest = f'task = "sentiment"\ninput = {json.dumps(reference)}\n'
        return self._manifest(stem, f"input-{what}", manifest.encode(), ".toml", valid=what == "good-csv")

    def _odd_name(self, stem: str) -> Entry:
        body = VALID_TASKS[0].format(n=stem).encode()
        name = self.rng.choice([
            stem.encode() + b"-\xff\xfe.toml",                    # not UTF-8
            stem.encode() + b"-" + b"\xff" * 240 + b".toml",      # not UTF-8, 1,000 characters as \xNN
            stem.encode() + b"-" + b"n" * 230 + b".toml",          # at the 255-byte limit
            stem.encode() + b"-new\nline.toml",
            stem.encode() + b".TOML",
            b"-" + stem.encode() + b".json",
            stem.encode() + b" with spaces .toml",
            stem.encode() + "-\u202eémoji🙂.toml".encode(),
            stem.encode() + b".toml.json",
        ])
        if name.lower().endswith(b".json"):
            body = json.dumps({"task": "sentiment", "texts": [f"Fine {stem}."]}).encode()
        self._write(name, body)
        try:
            name.decode()
        except UnicodeDecodeError:  # rejected: batchd's names and outbox folders are UTF-8
            return Entry("odd-name", name, is_manifest_name(name))
        return Entry("odd-name", name, is_manifest_name(name), valid=is_manifest_name(name))

    def _ignored(self, stem: str) -> Entry:
        name = self.rng.choice([f".{stem}.toml", f"{stem}.toml.tmp", f"{stem}.txt", f"#{stem}.toml#"]).encode()
        self._write(name, b"whatever")
        return Entry("ignored-name", name, is_manifest_name(name))


# -- watching the daemon ------------------------------------------------------------------------------------


def audit_environment(folder: Path, bait: Path) -> dict[str, str]:
    """Environment variables that install an audit hook in every batchd interpreter started with them:
    each ``open`` of a path under ``bait`` is appended to ``folder/opened-bait.log``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import os, sys

        _BAIT = {str(bait.resolve())!r}
        _LOG = {str(folder / "opened-bait.log")!r}

        def _hook(event, args):
            if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
                return  # an open of a descriptor: its path was checked when it was opened
            path, flags = os.fsdecode(args[0]), args[2] if isinstance(args[2], int) else 0
            # An O_NOFOLLOW open of a symlink fails before reading anything: only the link's own path counts.
            reached = os.path.abspath(path) if flags & os.O_NOFOLLOW else os.path.realpath(path)
            if reached.startswith(_BAIT):
                with open(_LOG, "a") as log:
                    log.write(path + "\\n")

        sys.addaudithook(_hook)
        """))
    return {"PYTHONPATH": str(folder)}


def bait_reads(folder: Path) -> list[str]:
    log = folder / "opened-bait.log"
    return log.read_text().splitlines() if log.exists() else []


@dataclass
class Outcome:
    accounted: int
    delivered: int
    rejected: int
    succeeded: int
    lost: list[str]
    valid_not_succeeded: list[str]
    longest_message: int  # characters of a rejection's whole error, as json
    longest_rejection: int  # characters of a rejection's message, cut at ERROR_CHARS
    bait_reads: list[str]
    kinds: Counter


def check_outcome(entries: list[Entry], outbox: Path, audit_folder: Path) -> Outcome:
    """What became of ``entries`` once the daemon has taken them (see the module docstring)."""
    summaries = {}
    for folder in outbox.iterdir():
        summary_path = folder / "summary.json"
        if folder.is_dir() and summary_path.exists():
            summary = json.loads(summary_path.read_text())
            summaries.setdefault(summary.get("manifest"), []).append(summary)
    lost, not_succeeded, longest, longest_rejection = [], [], 0, 0
    accounted = [entry for entry in entries if entry.accounted]
    for entry in accounted:
        name = readable_name(os.fsdecode(entry.name))  # as summary.json spells a name that is not UTF-8
        found = summaries.get(name)
        if not found:
            lost.append(name)
            continue
        states = {summary["state"] for summary in found}
        if entry.valid and states != {"succeeded"}:
            not_succeeded.append(f"{name}: {[summary.get('error') for summary in found]}")
    all_summaries = [summary for group in summaries.values() for summary in group]
    for summary in all_summaries:
        error = summary.get("error") or {}
        longest = max(longest, len(json.dumps(error, ensure_ascii=False)))
        if summary["state"] == "rejected":
            longest_rejection = max(longest_rejection, len(error.get("message") or ""))
    return Outcome(
        accounted=len(accounted), delivered=len(all_summaries),
        rejected=sum(summary["state"] == "rejected" for summary in all_summaries),
        succeeded=sum(summary["state"] == "succeeded" for summary in all_summaries),
        lost=lost, valid_not_succeeded=not_succeeded, longest_message=longest, longest_rejection=longest_rejection,
        bait_reads=bait_reads(audit_folder), kinds=Counter(entry.kind for entry in entries))
