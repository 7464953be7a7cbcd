"""``mirrord-admin`` (``python -m mirrord.admin``): inspect and prune the
cache, check the configuration.

With the daemon running, the work goes through its admin socket
(``state_dir/admin.sock``, see ``mirrord.daemon.admin``), so the live
index, the clients reading a blob and the metrics stay right. With it
stopped, the state directory is opened directly. Writing to a state
directory whose daemon holds the socket, but cannot be reached (another
user), is refused: two writers would disagree about the index.

No Twisted reactor: a blocking socket and plain files suffice for a
command that runs, prints and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mirrord import config as configuration
from mirrord.config import ConfigError
from mirrord.store import inventory
from mirrord.store.disk import BlobStore

SOCKET_NAME = "admin.sock"
WAIT = 600.0


class AdminError(Exception):
    """A one-line error for the admin."""


class Progress:
    """One updating line on a terminal; a plain line now and then otherwise."""

    def __init__(self, out: TextIO, label: str) -> None:
        self.out, self.label = out, label
        self.tty = out.isatty()
        self._last = -1.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        text = f"{self.label}: {done}/{total}"
        if self.tty:
            self.out.write(f"\r{text}\x1b[K")
            self._shown = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        if self._shown:
            self.out.write("\n")
            self.out.flush()


class Remote:
    """The running daemon, through its socket."""

    def __init__(self, path: Path, timeout: float = WAIT) -> None:
        self.path, self.timeout = path, timeout

    def call(self, request: dict, progress: Callable[[int, int], None] | None = None) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reader = sock.makefile("rb")
            for line in reader:
                message = json.loads(line)
                if "progress" in message:
                    if progress is not None:
                        progress(*message["progress"])
                    continue
                if not message.get("ok"):
                    raise AdminError(message.get("error", "the daemon refused"))
                return message["result"]
        raise AdminError("the daemon closed the admin socket without an answer")


class Local:
    """A stopped daemon's state directory, opened directly."""

    def __init__(
        self, state_dir: Path, configured_pins: tuple[str, ...], cache: str = "cache"
    ) -> None:
        root = state_dir / cache
        if not (root / "blobs").is_dir():
            raise AdminError(f"no cache under {state_dir}")
        self.configured_pins = configured_pins
        # The index other daemons sharing the cache count on sees the deletes.
        self.store = BlobStore(
            root, 0, pinned=configured_pins + inventory.read_pins(root), share=True
        )
        self.store.entries.clear()
        self._indexed = False

    def _view(self) -> inventory.View:
        if not self._indexed:
            self.store.rebuild()
            self._indexed = True
        return inventory.View.of(self.store)

    def call(self, request: dict, progress: Callable[[int, int], None] | None = None) -> Any:
        op = request["op"]
        if op == "list":
            return inventory.listing(self._view())
        if op == "show":
            return inventory.show(self._view(), inventory.Target.parse(request["target"]))
        if op == "delete":
            plan = inventory.plan_delete(self._view(), inventory.Target.parse(request["target"]))
            result = plan.describe()
            if not request.get("dry_run"):
                tag_files, removed, busy = inventory.apply_index(self.store, plan)
                inventory.remove_files(self.store, tag_files, removed, progress or _quiet)
                result["busy"] = busy
            return result
        pins = set(inventory.read_pins(self.store.root))
        if op in ("pin", "unpin"):
            (pins.add if op == "pin" else pins.discard)(request["pattern"])
            inventory.write_pins(self.store.root, pins)
        return {"admin": sorted(pins), "configured": list(self.configured_pins)}


def _quiet(done: int, total: int) -> None:
    pass


def connect(
    state_dir: Path, configured_pins: tuple[str, ...], writing: bool, cache: str = "cache"
) -> Remote | Local:
    """The daemon's socket when it answers, else the state directory."""
    path = state_dir / SOCKET_NAME
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(5.0)
            probe.connect(str(path))
            return Remote(path)
        except PermissionError:
            raise AdminError(
                f"the daemon's admin socket {path} is not yours: run as the service user"
            ) from None
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # a socket left by a daemon that stopped
        finally:
            probe.close()
    lock = state_dir / f"{SOCKET_NAME}.lock"
    if writing and _held(lock):
        raise AdminError(f"a daemon holds {lock} but its socket does not answer: not writing")
    return Local(state_dir, configured_pins, cache)


def _held(lock: Path) -> bool:
    """Whether twisted's PID lock beside the socket names a live process."""
    try:
        pid = int(os.readlink(lock) if lock.is_symlink() else lock.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def when(seconds: float | None) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def print_listing(repos: list[dict], out: TextIO) -> None:
    if not repos:
        out.write("the cache is empty\n")
        return
    for repo in repos:
        name = (
            f"{repo['registry']}/{repo['repository']}" if repo["registry"] else repo["repository"]
        )
        out.write(
            f"{name}  {human(repo['size'])}  {repo['blobs']} blobs  "
            f"last used {when(repo['last_access'])}\n"
        )
        for tag in repo["tags"]:
            missing = f" ({tag['missing']} not cached)" if tag["missing"] else ""
            out.write(
                f"  :{tag['tag']}  {tag['digest'][:19]}  {human(tag['size'])}  "
                f"{tag['blobs']} blobs{missing}  last used {when(tag['last_access'])}\n"
            )


def print_image(image: dict, out: TextIO) -> None:
    out.write(f"tags: {', '.join(image['tags']) or '-'}\n")
    out.write(f"{human(image['size'])} in {image['cached']} cached blobs\n")
    for title in ("manifests", "blobs"):
        out.write(f"{title}:\n")
        for row in image[title]:
            size = human(row["size"]) if row["cached"] else "not cached"
            out.write(f"  {row['digest']}  {size}  {row['media_type'] or ''}\n")


def parser() -> argparse.ArgumentParser:
    # The common options go before or after the command (``mirrord-admin
    # check-config --config FILE``, as ``twistd mirrord --check-config``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=argparse.SUPPRESS, help="TOML file")
    common.add_argument(
        "--state-dir", type=Path, default=argparse.SUPPRESS, help="default: the config's"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON out")
    p = argparse.ArgumentParser(
        prog="mirrord-admin", description=__doc__.split("\n\n")[0], parents=[common]
    )
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    sub.add_parser("list", help="cached repositories and tags, sizes, blob counts, last use")
    show = sub.add_parser("show", help="one image's manifests and blobs")
    show.add_argument("image", help="NAME[:TAG|@DIGEST]")
    delete = sub.add_parser(
        "delete", help="a tag, an image or a repository, with the blobs nothing else references"
    )
    delete.add_argument("image", help="NAME (the repository), NAME:TAG or NAME@DIGEST")
    delete.add_argument("--dry-run", "-n", action="store_true", help="say what would go")
    for name, text in (("pin", "keep through eviction"), ("unpin", "stop keeping")):
        command = sub.add_parser(name, help=f"{text}: NAME pattern or NAME:TAG pattern")
        command.add_argument("pattern", help="e.g. library/* or library/alpine:3.*")
    sub.add_parser("pins", help="the pins in force")
    sub.add_parser("check-config", help="validate the configuration as a start would")
    return p


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = parser().parse_args(argv)
    for name, default in (("config", None), ("state_dir", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.command == "check-config":
        return _check_config(args.config, args.state_dir, err)
    try:
        config = configuration.load(args.config)
    except ConfigError as e:
        err.write(f"mirrord-admin: {e}\n")
        return 1
    state_dir = args.state_dir or Path(config.state_dir)
    request: dict[str, Any] = {"op": args.command}
    if args.command in ("show", "delete"):
        request["target"] = args.image
    if args.command == "delete":
        request["dry_run"] = args.dry_run
    if args.command in ("pin", "unpin"):
        request["pattern"] = args.pattern
    writing = args.command in ("pin", "unpin") or (args.command == "delete" and not args.dry_run)
    progress = Progress(err, "removing blobs")
    try:
        target = connect(state_dir, config.cache.pinned, writing, config.cache.path)
        result = target.call(request, progress)
    except (AdminError, LookupError, ValueError, OSError) as e:
        progress.close()
        err.write(f"mirrord-admin: {e}\n")
        return 1
    progress.close()
    if args.json:
        json.dump(result, out, indent=1)
        out.write("\n")
    elif args.command == "list":
        print_listing(result, out)
    elif args.command == "show":
        print_image(result, out)
    elif args.command == "delete":
        verb = "would remove" if args.dry_run else "removed"
        out.write(
            f"{verb} {len(result['tags'])} tags, {len(result['blobs'])} blobs, "
            f"{human(result['bytes'])}\n"
        )
        for tag in result["tags"]:
            out.write(f"  {tag}\n")
        if result.get("busy"):
            out.write(f"kept {len(result['busy'])} blobs being read now; delete again later\n")
    else:
        out.write(f"admin pins: {', '.join(result['admin']) or '-'}\n")
        out.write(f"configured pins: {', '.join(result['configured']) or '-'}\n")
    return 0


def _check_config(path: Path | None, state_dir: Path | None, err: TextIO) -> int:
    """``twistd mirrord --check-config``, the same check."""
    from mirrord.daemon.tap import Options

    argv = ["--check-config"]
    if path is not None:
        argv += ["--config", str(path)]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    try:
        Options().parseOptions(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            err.write(e.code + "\n")
            return 1
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
