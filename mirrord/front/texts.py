"""Every user-visible text of the usage and status page, in Chinese and
English, and which of the two a request gets.

The seed's users read Chinese first: ``Accept-Language`` decides (any
``zh`` tag is Chinese), ``?lang=`` overrides it (the page's switch link),
and with neither the page is Chinese. Texts are format strings whose
fields the caller fills with values it has escaped.
"""

# Chinese typography uses full-width commas, colons and brackets: not typos.
# ruff: noqa: RUF001

from __future__ import annotations

from twisted.web.server import Request

LANGUAGES = ("zh", "en")
DEFAULT = "zh"

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "html_lang": "en",
        "title": "mirrord at {host}",
        "intro": "A pull-through mirror of {registries}.",
        "switch": "中文",
        "switch_lang": "zh",
        "self_signed": (
            "<b>This mirror uses a self-signed certificate</b> (SHA-256 {fingerprint}). "
            "Clients must trust <code>{path}</code>: copy it to "
            "<code>/etc/docker/certs.d/{host}/ca.crt</code> (Docker), or configure a real "
            "certificate with <code>cert</code> and <code>key</code>."
        ),
        "pull_directly": "Pull directly",
        "docker_mirrors": "Docker registry-mirrors (Docker Hub only)",
        "then_restart": "# then: sudo systemctl restart docker",
        "containerd_all": "containerd, every served registry",
        "containerd_ns": (
            "# containerd adds ?ns=<registry> to each request; registries this\n"
            "# mirror does not serve answer 404 and containerd moves on.\n"
        ),
        "upstreams_in_order": "Upstreams, in order:",
        "copy": "Copy",
        "copied": "Copied",
        "status": "Status",
        "cache": "Cache",
        "cache_used": "{used} of {limit} used ({percent}), {entries} blobs",
        "cache_off": "off: every request goes upstream",
        "window": "Window",
        "last_hour": "Last hour",
        "last_day": "Last 24 hours",
        "hit_ratio": "Hit ratio",
        "hits_of": "{ratio} ({hits} of {requests})",
        "no_requests": "no cache requests",
        "from_cache": "From cache",
        "from_upstream": "From upstream",
        "chart_hour": "Bytes sent per minute over the last hour, from cache and from upstream",
        "chart_day": "Bytes sent per hour over the last 24 hours, from cache and from upstream",
        "hour_ago": "60 min ago",
        "day_ago": "24 h ago",
        "now": "now",
        "upstreams": "Upstreams",
        "healthy": "healthy",
        "resting": "resting until {until} UTC ({seconds} s left, rate-limited)",
        "quota": "pulls left for {identity}: {quota}",
        "fills": "Fills in progress",
        "fleet": "Fleet",
        "shared_store": "Shared store (S3)",
        "shared_used": "{used} in {blobs} blobs, cap {limit}; {uploads} uploaded by this process",
        "redis": "Redis",
        "up": "answering",
        "down": "not answering: serving from this host and the upstream",
        "members": "Members",
        "leases": "Blobs being fetched for the fleet",
        "metrics_hint": "The same figures for Prometheus: <code>/metrics</code>.",
        "since_start": "Counted since the daemon started ({minutes} min of history).",
    },
    "zh": {
        "html_lang": "zh-CN",
        "title": "mirrord 镜像：{host}",
        "intro": "拉取缓存镜像，代理 {registries}。",
        "switch": "English",
        "switch_lang": "en",
        "self_signed": (
            "<b>本镜像使用自签名证书</b>（SHA-256 {fingerprint}）。客户端必须信任 "
            "<code>{path}</code>：复制到 <code>/etc/docker/certs.d/{host}/ca.crt</code>"
            "（Docker），或用 <code>cert</code> 和 <code>key</code> 配置正式证书。"
        ),
        "pull_directly": "直接拉取",
        "docker_mirrors": "Docker registry-mirrors（仅 Docker Hub）",
        "then_restart": "# 然后：sudo systemctl restart docker",
        "containerd_all": "containerd，本镜像代理的所有仓库",
        "containerd_ns": (
            "# containerd 会在每个请求上加 ?ns=<仓库>；本镜像不代理的仓库\n"
            "# 返回 404，containerd 随即尝试下一个地址。\n"
        ),
        "upstreams_in_order": "上游（按顺序）：",
        "copy": "复制",
        "copied": "已复制",
        "status": "状态",
        "cache": "缓存",
        "cache_used": "已用 {used}，上限 {limit}（{percent}），共 {entries} 个 blob",
        "cache_off": "已关闭：所有请求直接转发上游",
        "window": "时段",
        "last_hour": "最近一小时",
        "last_day": "最近 24 小时",
        "hit_ratio": "命中率",
        "hits_of": "{ratio}（{requests} 次中 {hits} 次）",
        "no_requests": "暂无缓存请求",
        "from_cache": "来自缓存",
        "from_upstream": "来自上游",
        "chart_hour": "最近一小时每分钟发送的字节数（缓存与上游）",
        "chart_day": "最近 24 小时每小时发送的字节数（缓存与上游）",
        "hour_ago": "60 分钟前",
        "day_ago": "24 小时前",
        "now": "现在",
        "upstreams": "上游",
        "healthy": "正常",
        "resting": "限流休息中，直到 {until} UTC（还剩 {seconds} 秒）",
        "quota": "{identity} 剩余拉取次数：{quota}",
        "fills": "正在填充的缓存",
        "fleet": "集群",
        "shared_store": "共享存储（S3）",
        "shared_used": "{used}，共 {blobs} 个 blob，上限 {limit}；本进程已上传 {uploads} 个",
        "redis": "Redis",
        "up": "正常",
        "down": "无响应：由本机和上游提供服务",
        "members": "成员",
        "leases": "正在为集群拉取的 blob",
        "metrics_hint": "Prometheus 可从 <code>/metrics</code> 读取同样的数据。",
        "since_start": "自守护进程启动起统计（已有 {minutes} 分钟的记录）。",
    },
}


def _accepted(header: str) -> list[str]:
    """``Accept-Language`` tags, most preferred first (q=0 dropped)."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag and quality > 0:
            ranked.append((-quality, index, tag.strip().lower()))
    return [tag for _, _, tag in sorted(ranked)]


def language(request: Request) -> str:
    """``zh`` or ``en`` for this request."""
    asked = request.args.get(b"lang", [b""])[-1].decode("latin-1")
    if asked in LANGUAGES:
        return asked
    header = (request.getHeader(b"accept-language") or b"").decode("latin-1")
    for tag in _accepted(header):
        primary = tag.split("-", 1)[0]
        if primary in LANGUAGES:
            return primary
    return DEFAULT
