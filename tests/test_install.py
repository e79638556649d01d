"""install lays out an OS definition Ganeti accepts, whose scripts run in Ganeti's reset env."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from instance_cloudimage.install import install_os
from instance_cloudimage.params import PARAMETERS
from instance_cloudimage.variants import list_variants

from .conftest import Site, cli


def test_install_writes_a_valid_os_definition(site: Site, tmp_path: Path) -> None:
    os_dir = tmp_path / "os" / "cloudimage"
    r = cli("install", "--os-dir", str(os_dir), *site.cli_args())
    assert r.returncode == 0, r.stderr
    for verb in ("create", "import", "export", "rename", "verify"):
        mode = (os_dir / verb).stat().st_mode
        assert stat.S_ISREG(mode) and mode & stat.S_IXUSR
        assert (os_dir / verb).read_text().startswith("#!/")
    assert not (os_dir / "create_untrusted").exists()
    assert (os_dir / "ganeti_api_version").read_text() == "20\n"
    variants = (os_dir / "variants.list").read_text().splitlines()
    assert variants == list_variants(site_paths(site)) and "demo" in variants
    names = [line.split(" ", 1)[0] for line in (os_dir / "parameters.list").read_text().splitlines()]
    assert names == [p.name for p in PARAMETERS]
    info = json.loads((os_dir / "instance-cloudimage.json").read_text())
    assert info == {"config_dir": str(site.config_dir), "cache_dir": str(site.cache_dir)}


def site_paths(site: Site):  # type: ignore[no-untyped-def]
    from instance_cloudimage.config import Paths

    return Paths(site.config_dir, site.cache_dir)


def test_installed_verify_runs_with_ganetis_reset_environment(site: Site, tmp_path: Path) -> None:
    os_dir = tmp_path / "os" / "cloudimage"
    install_os(os_dir, site_paths(site))
    # Exactly what Ganeti passes verify: no HOME, no LANG, cwd = the OS dir.
    env = {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "OS_API_VERSION": "20", "OS_NAME": "cloudimage",
           "OS_VARIANT": "demo", "DEBUG_LEVEL": "0", "OSP_ARCH": "x86_64"}
    r = subprocess.run([str(os_dir / "verify"), "parameters"], env=env, cwd=os_dir,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(os_dir / "verify"), "parameters"], env={**env, "OSP_NOPE": "1"}, cwd=os_dir,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "unknown OS parameter 'nope'" in r.stderr


def test_install_refuses_a_broken_site_variant(site: Site, tmp_path: Path) -> None:
    (site.config_dir / "variants").mkdir()
    (site.config_dir / "variants" / "broken.conf").write_text("[Image]\nNope = 1\n")
    r = cli("install", "--os-dir", str(tmp_path / "os" / "cloudimage"), *site.cli_args())
    assert r.returncode == 2
    assert "unknown setting [Image] Nope" in r.stderr
    assert not os.path.exists(tmp_path / "os" / "cloudimage" / "create")


def test_install_into_an_unusable_directory_is_one_line(site: Site, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = cli("install", "--os-dir", str(tmp_path / "file" / "cloudimage"), *site.cli_args())
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"instance-cloudimage: error: cannot install the OS definition into {tmp_path / 'file' / 'cloudimage'}: "
        "Not a directory"]
