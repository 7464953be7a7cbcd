"""Configuration: defaults, the TOML file, command-line overrides, and the
one-line errors an operator sees for a bad file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mirrord import config
from mirrord.config import ConfigError, Timeouts
from mirrord.tap import Options, listen_description


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
        """Every documented key is read with its type."""
        path = self.write(
            'listen = [8443, "tcp6:9443"]\ncert = "/c.pem"\nkey = "/k.pem"\n'
            'state_dir = "/tmp/s"\ntls_min_version = "1.3"\nmax_redirects = 3\n'
            "rate_limit_seconds = 30\npool_size = 4\n"
            "[timeouts]\nconnect = 2\nresponse = 3.5\nbody_idle = 4\nclient_idle = 5\n"
            '[registries."docker.io"]\nupstreams = ["https://a.example", "https://b.example/"]\n'
        )
        loaded = config.load(path)
        self.assertEqual(loaded.listen, ("8443", "tcp6:9443"))
        self.assertEqual(loaded.timeouts, Timeouts(2, 3.5, 4, 5))
        self.assertEqual(loaded.default.upstreams, ("https://a.example", "https://b.example"))
        self.assertEqual(loaded.default.official_prefix, "library")
        self.assertEqual((loaded.max_redirects, loaded.pool_size), (3, 4))

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
        from mirrord.tap import needs_restart

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
