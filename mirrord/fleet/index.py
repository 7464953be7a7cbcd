"""The fleet-wide index of the shared store: every blob object in the bucket
with its size and last access, their total, and the pins, so every host
enforces one size cap and evicts the least recently used blob of the whole
fleet, never a pinned one.

Keys (all under ``prefix``): ``index:sizes`` (hash digest -> bytes),
``index:access`` (sorted set digest -> last access, Unix seconds),
``index:total`` (the sum of ``index:sizes``), ``pins`` (set of digests).
Every change that touches more than one of them is one Lua script, so they
move together: the total is the sum of the sizes after every script, and no
host sees a blob counted but not dated or the reverse. Needs Redis 6.2 or
later (``ZADD ... GT``).

Correctness, for the store that drives it (the order is what matters):

* **Publishing** is "upload the verified object, then ``add``". ``add`` is
  idempotent (a second add of a known digest only raises its last access),
  so two hosts publishing one digest, or a host retrying, count it once.
* **Evicting** is "``claim_eviction``, then delete the object". The claim
  removes the entry atomically, only if it is there and unpinned (and,
  when asked, only if nobody touched it since the candidate list was read,
  and only while the total is still above the cap). Of several hosts
  claiming one digest exactly one gets True, and only that one deletes, so
  an object is deleted once and the bytes freed are subtracted once: two
  hosts evicting together cannot both count the same blob towards their
  goal. With ``above`` (the cap) a claim also succeeds only while the
  shared total is still over it, and subtracts at once, so however many
  hosts evict together the fleet frees at most one blob more than needed.
* **A crash between the two steps of either** (a host dies after its
  upload but before ``add``, or after its claim but before the delete)
  leaves an *orphan*: an object in the bucket the index does not count.
  It costs space but never a wrong answer (hits look in the bucket, not
  here). The opposite order is never used, because its crash leaves a
  *dangling entry*, counted but gone: it shrinks the effective cap and
  would make a host pick a blob that is not there. Dangling entries still
  arise from outside (an object deleted by hand or by a bucket lifecycle
  rule, a Redis restored from an old snapshot); a host that finds an
  object missing should ``remove`` it at once.
* **A call that times out** may or may not have been applied (the script
  runs whole on the server, or not at all): an ``add`` that was not is an
  orphan, a ``claim_eviction`` that was (its caller, told False or an
  error, does not delete) is an orphan too. Both are the crash cases above.
* **Repair** is ``reconcile(listing, started)``, run now and then with a
  listing of the bucket begun at ``started``: orphans are added (their
  last access is the object's modification time, the most that is known,
  so eviction orphans, which were old, go first again), sizes that differ
  from the bucket's are corrected, and entries missing from the listing are
  removed if their last access is before ``started``. That guard is what
  makes reconciling safe while the fleet works: a blob published (or
  touched) after the listing began may be absent from the listing and is
  left alone. A blob claimed and deleted between the listing and the
  reconcile is re-added as a dangling entry, and the next reconcile removes
  it; each pass fixes everything that was wrong before it began and
  changed nothing during it, so a quiet fleet converges in one pass.
  Last, the total is recomputed from the sizes, in one script.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mirrord.fleet.redis import FleetRedis, Script

# KEYS: sizes, access, total; ARGV: digest, size, when.
_ADD = Script(
    """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  return redis.call('INCRBY', KEYS[3], ARGV[2])
end
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[1])
return tonumber(redis.call('GET', KEYS[3]) or '0')
"""
)

# KEYS: sizes, access, total; ARGV: digest.
_REMOVE = Script(
    """
local size = redis.call('HGET', KEYS[1], ARGV[1])
if not size then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], size)
return 1
"""
)

# KEYS: sizes, access, total, pins, repositories; ARGV: digest, seen access or '',
# cap or ''.
_CLAIM = Script(
    """
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then return 0 end
local size = redis.call('HGET', KEYS[1], ARGV[1])
if not size then return 0 end
if ARGV[2] ~= '' then
  local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
  if score and tonumber(score) > tonumber(ARGV[2]) then return 0 end
end
if ARGV[3] ~= '' then
  if tonumber(redis.call('GET', KEYS[3]) or '0') <= tonumber(ARGV[3]) then return 0 end
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], size)
redis.call('HDEL', KEYS[5], ARGV[1])
return 1
"""
)

# A host's pinned digests, kept for a time (KEYS[1], PX ARGV[1]); the fleet's
# pins (KEYS[2]) become the union of every host's that has not expired
# (those named by the pattern ARGV[2]). ARGV[3...]: the digests.
_MEMBER_PINS = Script(
    """
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 5000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 4999, #ARGV)))
end
if #ARGV > 2 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local hosts = redis.call('KEYS', ARGV[2])
if #hosts == 0 then
  redis.call('DEL', KEYS[2])
  return 0
end
return redis.call('SUNIONSTORE', KEYS[2], unpack(hosts))
"""
)

# KEYS: sizes, access, total; ARGV: digest, size, modified, digest, ...
# Numbers computed here go back to Redis through '%.0f': a bare Lua number
# may be written in exponent form.
_ENSURE = Script(
    """
local added, fixed = 0, 0
for i = 1, #ARGV, 3 do
  local digest, size = ARGV[i], ARGV[i + 1]
  local have = redis.call('HGET', KEYS[1], digest)
  if not have then
    redis.call('HSET', KEYS[1], digest, size)
    redis.call('ZADD', KEYS[2], ARGV[i + 2], digest)
    redis.call('INCRBY', KEYS[3], size)
    added = added + 1
  elseif tonumber(have) ~= tonumber(size) then
    redis.call('HSET', KEYS[1], digest, size)
    redis.call('INCRBY', KEYS[3], string.format('%.0f', tonumber(size) - tonumber(have)))
    fixed = fixed + 1
  end
end
return {added, fixed}
"""
)

# KEYS: sizes, access, total; ARGV: started, digest, digest, ...
_DROP = Script(
    """
local removed = 0
local started = tonumber(ARGV[1])
for i = 2, #ARGV do
  local size = redis.call('HGET', KEYS[1], ARGV[i])
  local score = redis.call('ZSCORE', KEYS[2], ARGV[i])
  if size and (not score or tonumber(score) < started) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('DECRBY', KEYS[3], size)
    removed = removed + 1
  end
end
return removed
"""
)

# KEYS: sizes, total. O(entries), once per reconcile.
_RECOUNT = Script(
    """
local total = 0
for _, size in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(size) end
redis.call('SET', KEYS[2], string.format('%.0f', total))
return string.format('%.0f', total)
"""
)

BATCH = 500
PAGE = 256


def _when(seconds: float) -> str:
    # repr round-trips a float exactly, so a score read back compares equal.
    return repr(float(seconds))


@dataclass(frozen=True)
class Reconciled:
    """What one ``reconcile`` changed."""

    orphans_added: int
    sizes_fixed: int
    dangling_removed: int
    total: int


class FleetIndex:
    """What the shared store holds, with sizes and last accesses, in Redis."""

    def __init__(self, redis: FleetRedis, prefix: str = "mirrord:") -> None:
        self.redis = redis
        self._sizes = prefix + "index:sizes"
        self._access = prefix + "index:access"
        self._total = prefix + "index:total"
        self._pins = prefix + "pins"
        self._host_pins = prefix + "pins:"
        self._repos = prefix + "index:repos"

    @property
    def _keys(self) -> list[str]:
        return [self._sizes, self._access, self._total]

    async def add(self, digest: str, size: int, when: float) -> int:
        """Count a published blob (once, however often it is added); the new total."""
        total = await self.redis.eval(_ADD, self._keys, [digest, int(size), _when(when)])
        return int(total)

    async def touch(self, digest: str, when: float) -> None:
        """Note an access at ``when``: only ever moves a known blob's last access later."""
        await self.redis.call("ZADD", self._access, "XX", "GT", _when(when), digest)

    async def remove(self, digest: str) -> bool:
        """Forget a blob (its object is gone); False if it was not counted."""
        return bool(await self.redis.eval(_REMOVE, self._keys, [digest]))

    async def size(self, digest: str) -> int | None:
        """A counted blob's size, or None."""
        size = await self.redis.call("HGET", self._sizes, digest)
        return None if size is None else int(size)

    async def total(self) -> int:
        """Bytes the index counts in the store."""
        return int(await self.redis.call("GET", self._total) or 0)

    async def count(self) -> int:
        """Blobs the index counts in the store."""
        return int(await self.redis.call("HLEN", self._sizes))

    async def oldest(self, n: int) -> list[tuple[str, int, float]]:
        """The ``n`` least recently used blobs: (digest, size, last access)."""
        return await self._page(0, n)

    async def _page(self, start: int, n: int) -> list[tuple[str, int, float]]:
        if n <= 0:
            return []
        flat = await self.redis.call("ZRANGE", self._access, start, start + n - 1, "WITHSCORES")
        digests, scores = flat[0::2], flat[1::2]
        if not digests:
            return []
        sizes = await self.redis.call("HMGET", self._sizes, *digests)
        return [
            (digest, int(size), float(score))
            for digest, score, size in zip(digests, scores, sizes, strict=True)
            # removed between the two calls
            if size is not None
        ]

    async def pin(self, digests: set[str]) -> None:
        """Keep these blobs from eviction on every host, until the next
        ``host_pins`` of any host rebuilds the set from what hosts say."""
        if digests:
            await self.redis.call("SADD", self._pins, *sorted(digests))

    async def unpin(self, digests: set[str]) -> None:
        """Let these blobs be evicted again."""
        if digests:
            await self.redis.call("SREM", self._pins, *sorted(digests))

    async def host_pins(self, host: str, digests: set[str], ttl: float) -> int:
        """This host's pinned digests (all of them, each time): the fleet's
        pins become the union of every host's still fresh. A host that stops
        saying a digest (its pattern removed, its tag moved) lets it go
        within ``ttl``. Returns how many digests the fleet pins."""
        return int(
            await self.redis.eval(
                _MEMBER_PINS,
                [self._host_pins + host, self._pins],
                [int(ttl * 1000), self._host_pins + "*", *sorted(digests)],
            )
        )

    async def set_repository(self, digest: str, repository: str) -> None:
        """The repository a blob was stored under (for repository pins)."""
        await self.redis.call("HSET", self._repos, digest, repository)

    async def repositories(self, digests: list[str]) -> dict[str, str]:
        """The repositories of ``digests`` that have one recorded."""
        if not digests:
            return {}
        values = await self.redis.call("HMGET", self._repos, *digests)
        return {d: v for d, v in zip(digests, values, strict=True) if v is not None}

    async def pinned(self) -> set[str]:
        """Every pinned digest."""
        return set(await self.redis.call("SMEMBERS", self._pins))

    async def eviction_candidates(
        self, target_bytes_to_free: int, limit: int
    ) -> list[tuple[str, int]]:
        """Unpinned blobs, least recently used first, until they add up to
        ``target_bytes_to_free`` or number ``limit``. Candidates only: a host
        deletes the ones ``claim_eviction`` gives it. It reads at most
        ``limit`` + pins entries, in pages."""
        if target_bytes_to_free <= 0 or limit <= 0:
            return []
        pins = await self.pinned()
        chosen: list[tuple[str, int]] = []
        freed = start = 0
        while start < limit + len(pins):
            page = await self._page(start, PAGE)
            if not page:
                break
            start += PAGE
            for digest, size, _ in page:
                if digest in pins:
                    continue
                chosen.append((digest, size))
                freed += size
                if freed >= target_bytes_to_free or len(chosen) >= limit:
                    return chosen
        return chosen

    async def claim_eviction(
        self, digest: str, seen_when: float | None = None, above: int | None = None
    ) -> bool:
        """Take ``digest`` out of the index to delete its object: True for
        exactly one caller, only if it is counted and unpinned, not accessed
        after ``seen_when`` (when given) and while the total is over
        ``above`` (when given). Whoever gets True deletes the object."""
        args = [
            digest,
            "" if seen_when is None else _when(seen_when),
            "" if above is None else int(above),
        ]
        keys = [*self._keys, self._pins, self._repos]
        return bool(await self.redis.eval(_CLAIM, keys, args))

    async def reconcile(
        self, listing: Iterable[tuple[str, int, float]], started: float
    ) -> Reconciled:
        """Make the index agree with a listing of the bucket (digest, size,
        modification time) begun at ``started``; see the module docstring
        for why each step is safe while other hosts work."""
        listed: dict[str, tuple[int, float]] = {d: (int(s), float(m)) for d, s, m in listing}
        added = fixed = 0
        items = list(listed.items())
        for offset in range(0, len(items), BATCH):
            args: list[object] = []
            for digest, (size, modified) in items[offset : offset + BATCH]:
                args += [digest, size, _when(modified)]
            batch_added, batch_fixed = await self.redis.eval(_ENSURE, self._keys, args)
            added += int(batch_added)
            fixed += int(batch_fixed)
        dangling = [d for d in await self._indexed() if d not in listed]
        removed = 0
        for offset in range(0, len(dangling), BATCH):
            batch = dangling[offset : offset + BATCH]
            removed += int(await self.redis.eval(_DROP, self._keys, [_when(started), *batch]))
        total = int(await self.redis.eval(_RECOUNT, [self._sizes, self._total], []))
        return Reconciled(added, fixed, removed, total)

    async def _indexed(self, rounds: int = 10_000) -> set[str]:
        """Every counted digest, by HSCAN (each round bounded, and at most
        ``rounds`` of them: ten million blobs)."""
        seen: set[str] = set()
        cursor = "0"
        for _ in range(rounds):
            cursor, flat = await self.redis.call("HSCAN", self._sizes, cursor, "COUNT", 1000)
            seen.update(flat[0::2])
            if cursor == "0":
                break
        return seen
