"""Configuration: defaults, the TOML file, command-line overrides, and the
one-line errors an operator sees for a bad file."""

from __future__ import annotations

import dataclasses
import re
import tempfile
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord import config
from mirrord.config import (
    Access,
    CacheConfig,
    ConfigError,
    FleetConfig,
    MetricsAccess,
    Registry,
    StoreConfig,
    Timeouts,
)
from mirrord.daemon.role import usable_cores
from mirrord.daemon.tap import Options, listen_description, reloader
from mirrord.daemon.tls import ServerTLS, make_context
from mirrord.passwords import make_hash
from tests.support.fakehub import Cdn, HubState, hub_resource
from tests.support.images import OCI_MANIFEST
from tests.support.memory import MemoryMirror
from tests.support.pki import make_pki

ACCEPT = {"Accept": [OCI_MANIFEST]}

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "mirrord.toml"


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> Path:
        path = Path(tempfile.mkdtemp()) / "mirrord.toml"
        path.write_text(text)
        return path

    def test_defaults_mirror_docker_hub(self) -> None:
        """With no file the daemon mirrors Docker Hub on 443 with a state dir."""
        defaults = config.Config()
        self.assertEqual(defaults.default.upstreams, ("https://registry-1.docker.io",))
        self.assertEqual(defaults.default.official_prefix, "library")
        self.assertEqual(defaults.listen, ("443",))
        self.assertEqual(defaults.tls_min_version, "1.2")

    def test_full_file(self) -> None:
        """Every key is read, with its type, into the record; none keeps its default."""
        users = {"ops": make_hash("s3cret")}
        path = self.write(
            'listen = [8443, "tcp6:9443"]\ncert = "/c.pem"\nkey = "/k.pem"\n'
            'state_dir = "/tmp/s"\ntls_min_version = "1.3"\ntls_ciphers = "ECDHE+AESGCM"\n'
            'upstream_ca = "/ca.pem"\nmax_redirects = 3\nrate_limit_seconds = 30\n'
            "quota_reserve = 9\n"
            'pool_size = 4\ngrace_period = 7.5\naccess_log = "/tmp/access.log"\n'
            "workers = 7\n"
            'default_registry = "ghcr.io"\n'
            'acme_domains = ["Mirror.Example.com"]\nacme_email = "ops@example.com"\n'
            'acme_directory = "https://acme.example/dir"\nacme_ca = "/acme-ca.pem"\n'
            'acme_challenge = "http-01"\nacme_http_listen = 8080\n'
            "acme_renew_before = 86400\nacme_retry_after = 5\n"
            "[timeouts]\nconnect = 2\nresponse = 3.5\nbody_idle = 4\nclient_idle = 5\n"
            '[cache]\nenabled = false\nmax_size = "2MB"\nhigh_watermark = 0.9\n'
            "low_watermark = 0.5\nstale_max_age = 60\nfill_timeout = 70\nauth_ttl = 80\n"
            "tag_ttl = 5\nresume_attempts = 2\n"
            'pinned = ["library/*"]\n'
            'warm = ["library/alpine:3.20", "library/busybox@sha256:' + "a" * 64 + '"]\n'
            "warm_interval = 600\n"
            'path = "/srv/cache"\n'
            '[access]\nblock_user_agents = ["^curl/"]\nallow_clients = ["10.0.0.0/8"]\n'
            'trusted_proxies = ["127.0.0.1"]\nmax_connections_per_client = 3\n'
            "max_requests_per_client = 4\nretry_after = 5\n"
            "max_failed_logins = 6\nfailed_login_window = 90\n"
            f'[access.users]\nops = "{users["ops"]}"\n'
            '[metrics]\nallow = ["10.1.0.0/16"]\n'
            '[registries."docker.io"]\nupstreams = ["https://a.example", "https://b.example/"]\n'
            'official_prefix = "lib"\nhosts = ["Hub.Example"]\nallow = ["lib/*"]\n'
            'deny = ["lib/secret*"]\n'
            '[registries."ghcr.io"]\n'
        )
        expected = config.Config(
            listen=("8443", "tcp6:9443"),
            cert="/c.pem",
            key="/k.pem",
            state_dir="/tmp/s",
            tls_min_version="1.3",
            tls_ciphers="ECDHE+AESGCM",
            upstream_ca="/ca.pem",
            max_redirects=3,
            rate_limit_seconds=30,
            quota_reserve=9,
            pool_size=4,
            grace_period=7.5,
            workers=7,
            access_log="/tmp/access.log",
            default_registry="ghcr.io",
            acme_domains=("mirror.example.com",),
            acme_email="ops@example.com",
            acme_directory="https://acme.example/dir",
            acme_ca="/acme-ca.pem",
            acme_challenge="http-01",
            acme_http_listen="8080",
            acme_renew_before=86400.0,
            acme_retry_after=5.0,
            timeouts=Timeouts(2, 3.5, 4, 5),
            cache=CacheConfig(
                False,
                2_000_000,
                0.9,
                0.5,
                60,
                70,
                80,
                5,
                2,
                ("library/*",),
                ("library/alpine:3.20", "library/busybox@sha256:" + "a" * 64),
                600,
                "/srv/cache",
            ),
            access=Access(
                ("^curl/",),
                ("10.0.0.0/8",),
                ("127.0.0.1",),
                3,
                4,
                5,
                users,
                max_failed_logins=6,
                failed_login_window=90,
            ),
            metrics=MetricsAccess(("10.1.0.0/16",)),
            registries={
                "docker.io": Registry(
                    "docker.io",
                    ("https://a.example", "https://b.example"),
                    "lib",
                    ("hub.example",),
                    ("lib/*",),
                    ("lib/secret*",),
                ),
                "ghcr.io": Registry("ghcr.io", ("https://ghcr.io",)),
            },
        )
        # The file sets every key: a key added to a record must be added here
        # ([store] and [fleet] need the cache on, which this file turns off:
        # tests/test_fleet_config.py reads their full file).
        defaults = config.Config()
        for record, default in (
            (expected, defaults),
            (expected.timeouts, defaults.timeouts),
            (expected.cache, defaults.cache),
            (expected.access, defaults.access),
            (expected.metrics, defaults.metrics),
        ):
            for f in dataclasses.fields(record):
                if f.name in ("store", "fleet"):
                    continue
                self.assertNotEqual(getattr(record, f.name), getattr(default, f.name), f.name)
        self.assertRecord(config.load(path), expected)

    def assertRecord(self, loaded: config.Config, expected: config.Config) -> None:
        """Field by field (for a readable failure), then the whole record."""
        for f in dataclasses.fields(config.Config):
            with self.subTest(key=f.name):
                self.assertEqual(getattr(loaded, f.name), getattr(expected, f.name))
        self.assertEqual(loaded, expected)

    def test_shipped_example_uncommented(self) -> None:
        """The shipped example with every key uncommented loads to exactly the values it shows."""
        text = EXAMPLE.read_text()
        # The users example elides its hash; put in a real one.
        ops_hash = make_hash("example")
        text = text.replace('#ops = "scrypt$16384$8$1$..."', f'#ops = "{ops_hash}"')
        secret = self.write("hub-access-token\n")
        text = text.replace('"/etc/mirrord/dockerhub.token"', f'"{secret}"')
        uncommented = re.sub(r"(?m)^#(?=[^\s#])", "", text)
        self.assertNotRegex(uncommented, r"(?m)^#\S", "a commented key was left")
        loaded = config.load(self.write(uncommented))
        expected = config.Config(
            listen=("443",),
            cert="/etc/letsencrypt/live/mirror.example.com/fullchain.pem",
            key="/etc/letsencrypt/live/mirror.example.com/privkey.pem",
            state_dir="/var/lib/mirrord",
            tls_min_version="1.2",
            tls_ciphers="ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!DSS",
            upstream_ca="",
            max_redirects=5,
            rate_limit_seconds=60.0,
            quota_reserve=5,
            pool_size=16,
            grace_period=30.0,
            workers=2,
            access_log="/var/log/mirrord/access.log",
            default_registry="docker.io",
            acme_domains=(),
            acme_email="",
            acme_directory="https://acme-v02.api.letsencrypt.org/directory",
            acme_ca="",
            acme_challenge="tls-alpn-01",
            acme_http_listen="80",
            acme_renew_before=2592000.0,
            acme_retry_after=60.0,
            timeouts=Timeouts(connect=10.0, response=30.0, body_idle=60.0, client_idle=300.0),
            cache=CacheConfig(
                enabled=True,
                max_size=50 << 30,
                high_watermark=0.95,
                low_watermark=0.85,
                stale_max_age=604800.0,
                fill_timeout=600.0,
                auth_ttl=300.0,
                tag_ttl=60.0,
                resume_attempts=3,
                pinned=("library/*", "myorg/app:1.*"),
                warm=("library/alpine:3.20", "library/nginx:latest"),
                warm_interval=21600.0,
            ),
            access=Access(
                block_user_agents=(),
                allow_clients=(),
                trusted_proxies=(),
                max_connections_per_client=0,
                max_requests_per_client=0,
                retry_after=10,
                users={"ops": ops_hash},
            ),
            metrics=MetricsAccess(allow=("127.0.0.1/32", "::1/128")),
            store=StoreConfig(
                "s3",
                "https://s3.example.net",
                "mirrord",
                "us-east-1",
                "",
                "MIRRORDKEY",
                "/etc/mirrord/s3-secret",
                "",
                False,
                600,
                2 << 40,
                10,
                3,
                30,
                16 << 20,
            ),
            fleet=FleetConfig(
                "redis://10.0.0.5:6379/0",
                "https://10.0.0.2:443",
                "/etc/mirrord/fleet-secret",
                "/etc/mirrord/fleet-ca.pem",
                "mirror-a",
                30,
                2,
            ),
            registries={
                "docker.io": Registry(
                    "docker.io",
                    ("https://registry-1.docker.io", "https://mirror.gcr.io"),
                    official_prefix="library",
                    hosts=(),
                    allow=("library/*", "myorg/*"),
                    deny=(),
                    username="mirroruser",
                    password_file=str(secret),
                ),
                "ghcr.io": Registry(
                    "ghcr.io", ("https://ghcr.io",), hosts=("ghcr.mirror.example.com",)
                ),
            },
        )
        self.assertRecord(loaded, expected)

    def test_shipped_example_documents_every_key(self) -> None:
        """Every key the loader accepts appears in the shipped example, in its own table."""
        data = tomllib.loads(re.sub(r"(?m)^#(?=[^\s#])", "", EXAMPLE.read_text()))
        tables = {"timeouts": Timeouts, "cache": CacheConfig, "access": Access}
        tables.update(metrics=MetricsAccess, store=StoreConfig, fleet=FleetConfig)
        for f in dataclasses.fields(config.Config):
            if f.name != "registries":
                self.assertIn(f.name, data, f.name)
        for table, record in tables.items():
            for f in dataclasses.fields(record):
                self.assertIn(f.name, data[table], f"[{table}] {f.name}")
        hub = data["registries"]["docker.io"]
        for f in dataclasses.fields(Registry):
            if f.name != "name":
                self.assertIn(f.name, hub, f"[registries.'docker.io'] {f.name}")

    def test_bad_warm_image_is_named(self) -> None:
        """A [cache] warm entry without a tag, or with a bad digest, stops loading with one line."""
        for entry, says in (
            ("library/alpine", "needs a tag"),
            ("library/alpine@sha256:abc", "is not a digest"),
            ("Library/Alpine:3", "not a valid repository name"),
        ):
            path = self.write(f'[cache]\nwarm = ["{entry}"]\n')
            with self.assertRaises(config.ConfigError) as caught:
                config.load(path)
            self.assertIn("key 'warm'", str(caught.exception))
            self.assertIn(says, str(caught.exception))
            self.assertIn(str(path), str(caught.exception))
        path = self.write("[cache]\nwarm_interval = 0\n")
        with self.assertRaises(config.ConfigError) as caught:
            config.load(path)
        self.assertIn("warm_interval", str(caught.exception))

    def test_unknown_key_is_named_with_file(self) -> None:
        path = self.write('listne = ["443"]\n')
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertIn(str(path), str(error))
        self.assertIn("unknown key 'listne'", str(error))

    def test_unknown_nested_key(self) -> None:
        error = self.assertRaises(ConfigError, config.load, self.write("[timeouts]\nconect = 1\n"))
        self.assertIn("[timeouts]: unknown key 'conect'", str(error))

    def test_wrong_type_is_named(self) -> None:
        error = self.assertRaises(ConfigError, config.load, self.write('pool_size = "many"\n'))
        self.assertIn("key 'pool_size' must be a int", str(error))
        error = self.assertRaises(ConfigError, config.load, self.write("cert = true\n"))
        self.assertIn("key 'cert' must be a string", str(error))

    def test_bad_metrics_allow_is_named(self) -> None:
        """A [metrics] allow entry that is no address or CIDR is named with its table."""
        path = self.write('[metrics]\nallow = ["127.0.0.1/32", "loopback"]\n')
        error = self.assertRaises(ConfigError, config.load, path)
        self.assertIn("[metrics]: allow 'loopback' is not an address or CIDR", str(error))
        error = self.assertRaises(ConfigError, config.load, self.write("[metrics]\nallow = 1\n"))
        self.assertIn("[metrics]: key 'allow' must be a array", str(error))

    def test_bad_upstream_url(self) -> None:
        error = self.assertRaises(
            ConfigError,
            config.load,
            self.write('[registries."docker.io"]\nupstreams = ["ftp://x"]\n'),
        )
        self.assertIn("ftp://x", str(error))

    def test_unreadable_and_invalid_files(self) -> None:
        missing = Path(tempfile.mkdtemp()) / "nope.toml"
        self.assertIn("cannot read", str(self.assertRaises(ConfigError, config.load, missing)))
        error = self.assertRaises(ConfigError, config.load, self.write("listen = [\n"))
        self.assertIn("not valid TOML", str(error))

    def test_bad_acme_settings(self) -> None:
        """Wildcards, addresses, a plain-HTTP directory, non-positive delays: refused by name."""
        for text, words in (
            ('acme_domains = ["*.example.com"]\n', "'*.example.com' is not a DNS name"),
            ('acme_domains = ["192.0.2.1"]\n', "'192.0.2.1' is not a DNS name"),
            ('acme_domains = ["a..example"]\n', "'a..example' is not a DNS name"),
            ("acme_domains = [443]\n", "key 'acme_domains' must be a string"),
            ('acme_directory = "http://acme.example/dir"\n', "'acme_directory' must be an https"),
            ("acme_renew_before = 0\n", "'acme_renew_before' must be positive"),
            ("acme_retry_after = -1\n", "'acme_retry_after' must be positive"),
            ('acme_challenge = "dns-01"\n', "'acme_challenge' must be one of tls-alpn-01, http-01"),
        ):
            with self.subTest(text=text):
                error = self.assertRaises(ConfigError, config.load, self.write(text))
                self.assertIn(words, str(error))

    def test_cert_without_key(self) -> None:
        error = self.assertRaises(ConfigError, config.load, self.write('cert = "/c.pem"\n'))
        self.assertIn("'cert' and 'key' must be given together", str(error))


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> config.Config:
        options = Options()
        options.parseOptions(["--config", str(self.empty), *argv])
        return options["mirrord"]

    def setUp(self) -> None:
        self.empty = Path(tempfile.mkdtemp()) / "empty.toml"
        self.empty.write_text("")

    def test_command_line_overrides(self) -> None:
        """--listen, --upstream (repeatable), --cert, --key and --state-dir override the file."""
        parsed = self.parse(
            "--listen",
            "8443",
            "--listen",
            "tcp:9443",
            "--upstream",
            "http://127.0.0.1:5000",
            "--upstream",
            "https://mirror.gcr.io",
            "--cert",
            "/c",
            "--key",
            "/k",
            "--state-dir",
            "/s",
        )
        self.assertEqual(parsed.listen, ("8443", "tcp:9443"))
        self.assertEqual(
            parsed.default.upstreams, ("http://127.0.0.1:5000", "https://mirror.gcr.io")
        )
        self.assertEqual((parsed.cert, parsed.key, parsed.state_dir), ("/c", "/k", "/s"))

    def test_workers_from_file_option_and_cores(self) -> None:
        """workers defaults to the usable cores, comes from the file, and --workers
        overrides it; 0 is refused with the key named."""
        self.assertEqual(self.parse().workers, usable_cores())
        self.empty.write_text("workers = 3\n")
        self.assertEqual(self.parse().workers, 3)
        self.assertEqual(self.parse("--workers", "1").workers, 1)
        self.empty.write_text("workers = 0\n")
        error = self.assertRaises(SystemExit, self.parse)
        self.assertIn("key 'workers' must be >= 1", str(error))
        self.empty.write_text("")
        error = self.assertRaises(SystemExit, self.parse, "--workers", "0")
        self.assertIn("key 'workers' must be >= 1", str(error))

    def test_bad_file_is_a_usage_error(self) -> None:
        self.empty.write_text("bogus = 1\n")
        error = self.assertRaises(SystemExit, self.parse)
        self.assertIn("unknown key 'bogus'", str(error))
        self.assertIn(str(self.empty), str(error))

    def test_bad_upstream_option(self) -> None:
        error = self.assertRaises(SystemExit, self.parse, "--upstream", "registry-1.docker.io")
        self.assertIn("--upstream", str(error))

    def test_bare_port_listens_everywhere(self) -> None:
        self.assertEqual(listen_description("443"), "tcp6:443:interface=\\:\\:")
        self.assertEqual(
            listen_description("tcp:1:interface=127.0.0.1"), "tcp:1:interface=127.0.0.1"
        )


class ReloadScopeTests(SynchronousTestCase):
    def test_reload_applies_tls_and_chains_and_names_the_rest(self) -> None:
        """A reload applies certificates, TLS settings and upstream chains; other
        changes are named as waiting for a restart."""
        from mirrord.daemon.tap import needs_restart

        old = config.from_mapping({"listen": [443]})
        new = config.from_mapping(
            {
                "listen": [443],
                "cert": "/c",
                "key": "/k",
                "tls_min_version": "1.3",
                "registries": {"docker.io": {"upstreams": ["https://m.example"]}},
            }
        )
        self.assertEqual(needs_restart(old, new), [])
        moved = config.from_mapping(
            {
                "listen": [8443],
                "access": {"max_requests_per_client": 3},
                "registries": {"ghcr.io": {}},
            }
        )
        self.assertEqual(needs_restart(old, moved), ["listen", "access", "registries"])


class ReloadTests(SynchronousTestCase):
    """The reloader, run against a wired mirror in memory."""

    def test_next_request_goes_to_the_reloaded_chain(self) -> None:
        """After a reload with a new upstream chain the next pull asks the new
        upstream; a broken reload keeps the chain in use."""
        tmp = Path(tempfile.mkdtemp())
        mirror = MemoryMirror(self, tmp, upstreams=("http://second.test",), cache=None)
        third = HubState(cdn_base="http://cdn3.test", auth=False)
        third.add("library/alpine", mirror.alpine)
        mirror.add_host(b"third.test", hub_resource(third))
        mirror.add_host(b"cdn3.test", Cdn(third))
        pki = make_pki(tmp / "pki")

        def chain_of(*upstreams: str) -> config.Config:
            hub = Registry("docker.io", upstreams, "library")
            return config.Config(
                state_dir=str(tmp),
                cert=str(pki.fullchain),
                key=str(pki.privkey),
                cache=CacheConfig(enabled=False),
                registries={"docker.io": hub},
            )

        running = chain_of("http://second.test")
        server_tls = ServerTLS(make_context(pki.fullchain, pki.privkey, "1.2", running.tls_ciphers))
        chains = {name: target.chain for name, target in mirror.wiring.targets.items()}
        next_load: list[config.Config] = [chain_of("http://third.test")]

        def load() -> config.Config:
            if not next_load:
                raise ConfigError("mirrord.toml: not valid TOML")
            return next_load.pop()

        reload = reloader(load, running, server_tls, chains)
        path = "/v2/alpine/manifests/latest"

        def gets() -> tuple[int, int]:
            return mirror.second.counts["GET manifests"], third.counts["GET manifests"]

        self.assertEqual(mirror.get(path, ACCEPT).code, 200)
        self.assertEqual(gets(), (1, 0))
        old_context = server_tls.context
        reload()
        self.assertIsNot(server_tls.context, old_context, "the certificate was not re-read")
        reply = mirror.get(path, ACCEPT)
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("docker-content-digest"), mirror.alpine.manifest_digest)
        self.assertEqual(
            (mirror.second.counts["GET manifests"], third.counts["GET manifests"]), (1, 1)
        )
        reload()  # the file is now broken: keep the running chain
        self.assertEqual(mirror.get(path, ACCEPT).code, 200)
        self.assertEqual(
            (mirror.second.counts["GET manifests"], third.counts["GET manifests"]), (1, 2)
        )
