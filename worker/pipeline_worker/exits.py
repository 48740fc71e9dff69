"""How a flow container ended, in words: its exit code, whether the kernel killed it for memory,
and the last lines it printed, bounded and redacted, so that a crash says why.

The container's output is read once, when it has exited, and only its tail is kept: the worker's
own log never holds a copy of it.
"""

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass

from prefect._internal.infrastructure_exit_codes import get_infrastructure_exit_info

TAIL_LINES = 50
TAIL_BYTES = 8 << 10
# What prefect.engine prints when the component's module cannot be loaded (an import or syntax
# error): its log line heads a traceback often longer than the tail, whose last line is the ScriptError.
LOAD_FAILED = ("Unexpected exception encountered when trying to load flow", "prefect.exceptions.ScriptError: Script at")
SCRIPT_ERROR = re.compile(r"ScriptError: Script at '[^']*' encountered an exception: ([A-Za-z_]\w*)\((.*)\)$")
EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt))(?::\s.*)?$")
USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@")  # scheme://user:password@host
QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?#]*)[?#]\S*")  # a presigned token, say
HINTS = {
    "ModuleNotFoundError": "add the module's package to the component's requirements.txt, run make lock, "
    "and deploy the component again",
    "ImportError": "check the component's requirements.txt and imports, then deploy it again",
    "SyntaxError": "fix the component's code, then deploy it again",
}


def tail_of(output: bytes, secrets: Iterable[str] = ()) -> str:
    """The last TAIL_LINES lines of `output`, at most TAIL_BYTES of them, redacted."""
    lines = output.decode("utf-8", errors="replace").rstrip("\n").splitlines()[-TAIL_LINES:]
    text = "\n".join(lines).encode()[-TAIL_BYTES:].decode("utf-8", errors="ignore")
    return redacted(text, secrets)


def redacted(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the given secret values, URL credentials or URL queries."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return QUERY.sub(r"\1", USERINFO.sub(r"\1", text))


@dataclass(frozen=True)
class Exit:
    """How a flow container ended."""

    code: int
    oom_killed: bool
    tail: str
    started: bool  # its flow run had reached Running
    mem_limit: str | None = None
    max_mem_limit: str | None = None

    @property
    def own_failure(self) -> bool:
        """The component's own code failed before its flow started (it could not be imported):
        not worth a retry, which would fail the same way."""
        return self.code == 1 and not self.started and any(marker in self.tail for marker in LOAD_FAILED)

    def reason(self) -> str:
        """One line: why the container ended, and what to do about it."""
        if self.oom_killed:
            bound = f", at most {self.max_mem_limit} (pools/policy.json)" if self.max_mem_limit else ""
            return (
                f"Killed for memory: it went over its mem_limit of {self.mem_limit}; raise mem_limit in its "
                f"deployment's job_variables{bound}."
            )
        if self.code == 137:
            return "Killed (SIGKILL), not for memory: stopped from outside, e.g. docker kill."
        error = last_exception(self.tail)
        if error and self.own_failure:
            hint = HINTS.get(EXCEPTION.match(error)[1], "fix the component, then deploy it again")
            return f"{error} (the component could not be loaded: {hint})"
        return error or last_line(self.tail)

    def message(self) -> str:
        """The run's state message: Prefect's own explanation of the code, then the reason."""
        info = get_infrastructure_exit_info(self.code)
        text = f"Flow run infrastructure exited with non-zero status code {self.code}. {info.explanation}"
        return f"{text} {self.reason()}".strip()


def last_exception(tail: str) -> str | None:
    """The last exception `tail` names, e.g. `ModuleNotFoundError: No module named 'x'`, also where
    Prefect wraps it in a ScriptError."""
    for line in (line.strip() for line in reversed(tail.splitlines())):
        if found := SCRIPT_ERROR.search(line):
            try:
                detail = ast.literal_eval(found[2]) if found[2] else ""
            except (ValueError, SyntaxError):
                detail = found[2]
            return f"{found[1]}: {detail}" if detail else found[1]
        if EXCEPTION.match(line):
            return line
    return None


def last_line(tail: str) -> str:
    return next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
