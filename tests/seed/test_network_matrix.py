"""Every combination of the network parameters, read and rendered by Debian's real cloud-init 22.4.

The cross product of ``network`` × ``dns_nameservers`` × ``dns_search`` × NIC sets (as Ganeti's
environment gives them) × ``NetworkConfigVersion`` × seed delivery (NoCloud directory in the guest,
cidata disk, config-2 disk) goes through verify's check and create's seed builder and delivery;
every seed written is then read by cloud-init's own datasource, parsed by ``network_state`` without
skipping broken commands, and rendered by ENI (Debian 12), netplan (Ubuntu; then ``netplan
generate``), sysconfig and NetworkManager (RHEL family; libnm then loads each keyfile as the daemon
would): tests/support/cloudinit_network.py, in one process for all of them.  Each rendering must
put the expected addresses, gateways, DNS servers and search domains on the expected interface
(tests/support/network_checks.py).  A combination verify refuses must be refused by create too,
and the other way round.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.ganeti.env import Disk, Script, parse_environment
from instance_cloudimage.ganeti.variants import Variant, load_variant
from instance_cloudimage.params.table import validate_parameters
from instance_cloudimage.runtime.errors import ParameterError, SeedError
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig
from instance_cloudimage.seed.configdrive import build_configdrive
from instance_cloudimage.seed.content import build_nocloud, check_variant_parameters, seed_input
from instance_cloudimage.seed.deliver import write_nocloud_dir
from instance_cloudimage.seed.drive import CIDATA, CONFIG_2, write_seed_disk
from tests.conftest import need_tools
from tests.support import network_checks as nc
from tests.support.network_matrix import Combination, combinations

pytestmark = pytest.mark.integration

DRIVER = Path(__file__).resolve().parents[1] / "support" / "cloudinit_network.py"
SYSTEM_PYTHON = "/usr/bin/python3"
SEED_DISK_MIB = 2
EXPECTED_COMBINATIONS = 3 * 4 * 3 * 8 * 2 * 3


def load_variants(tmp_path: Path) -> dict[int, Variant]:
    site = tmp_path / "etc" / "variants"
    site.mkdir(parents=True)
    for version in (1, 2):
        (site / f"net-v{version}.conf").write_text(
            f"[Variant]\nAgent = cloud-init\nNetworkConfigVersion = {version}\n"
            "[Image]\nURL = https://example.test/net.qcow2\n")
    paths = Paths(tmp_path / "etc", tmp_path / "cache")
    return {v: load_variant(f"net-v{v}", paths) for v in (1, 2)}


def verify_problems(combo: Combination, variant: Variant) -> list[str]:
    """What verify says (it has no NICs: Ganeti's verify environment holds none)."""
    params = parse_environment(combo.environment(), Script.VERIFY).params
    return validate_parameters(params, SiteConfig()) or check_variant_parameters(params, variant)


def deliver(combo: Combination, variant: Variant, work: Path, seeds: dict[str, Path]) -> Path | str:
    """The seed create writes for ``combo``, as a directory cloud-init reads; or create's refusal."""
    genv = parse_environment(combo.environment(), Script.CREATE)
    try:
        inp = seed_input(genv, variant, nonce="matrix")
    except (ParameterError, SeedError) as e:
        return str(e)
    files = dict((build_configdrive(inp) if combo.delivery == "config-2" else build_nocloud(inp)).files)
    digest = hashlib.sha256(json.dumps([combo.delivery, sorted((k, v.hex()) for k, v in files.items())])
                            .encode()).hexdigest()[:20]
    if digest in seeds:  # the same bytes in the same place: cloud-init reads them once
        return seeds[digest]
    where = work / digest
    where.mkdir(parents=True)
    if combo.delivery == "nocloud-dir":
        write_nocloud_dir(where, files)
        seed = where / "var/lib/cloud/seed/nocloud"
    else:
        image = where / "seed.img"
        with open(image, "wb") as f:
            f.truncate(SEED_DISK_MIB << 20)
        disk = Disk(index=1, path=os.fspath(image), uri=None, size_mib=SEED_DISK_MIB, access="rw",
                    backend_type="file:loop", uuid=None)
        write_seed_disk(disk, CIDATA if combo.delivery == "cidata-disk" else CONFIG_2, files)
        seed = where / "read"  # what the guest sees when it mounts the disk
        seed.mkdir()
        subprocess.run(["mcopy", "-s", "-n", "-i", os.fspath(image), "::/*", os.fspath(seed)], check=True,
                       env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    seeds[digest] = seed
    return seed


def read_with_cloud_init(seeds: dict[str, tuple[str, Path]], work: Path) -> dict[str, dict[str, Any]]:
    cases = [{"id": key, "kind": kind, "seed": os.fspath(path)} for key, (kind, path) in seeds.items()]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    proc = subprocess.run([SYSTEM_PYTHON, os.fspath(DRIVER), os.fspath(work)], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return {r["id"]: r for r in json.loads(proc.stdout)}


def check(combo: Combination, result: dict[str, Any]) -> list[str]:
    if result["error"]:
        return [f"cloud-init: {result['error']}"]
    if result["warnings"]:
        return [f"cloud-init warned: {w}" for w in result["warnings"]]
    want = combo.nics.want(combo.network)
    if combo.network == "none" or not want:
        return [] if result["network_config"] is None else ["a network config, want none"]
    if not result["files"]:
        return ["no network config"]
    # The servers of the IP versions the DNS NIC has (seed/network.py _reachable_dns); none: no DNS.
    dns = next((w for w in want if w.dns), None)
    families = {4} if dns and (dns.dhcp4 or dns.v4) else set()
    families |= {6} if dns and dns.v6 else set()
    nameservers = tuple(a for a in combo.want_nameservers if ipaddress.ip_address(a).version in families)
    search = combo.want_search if nameservers else ()
    problems = []
    form = "v2" if combo.version == 2 and combo.delivery != "config-2" else "v1"
    for renderer, read in nc.READERS.items():
        rendered = read(result["files"][renderer])
        for p in nc.check_interfaces(rendered, want, nameservers, search,
                                     drop_routes=form == "v2", limits=nc.LIMITS.get((renderer, form), set())):
            problems.append(f"{renderer}: {p}")
    return problems


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    need_tools("mkfs.vfat", "mcopy", "netplan")
    probe = "import cloudinit.net.network_state, gi; gi.require_version('NM', '1.0')"
    if not Path(SYSTEM_PYTHON).exists() or subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True,
                                                          check=False).returncode:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's cloud-init and libnm's introspection data "
                        "(apt-get install cloud-init gir1.2-nm-1.0)")
        pytest.skip("Debian's cloud-init or gir1.2-nm-1.0 is not installed")


def test_every_network_combination_is_what_cloud_init_applies(tmp_path: Path) -> None:
    variants = load_variants(tmp_path)
    combos = list(combinations())
    assert len(combos) == EXPECTED_COMBINATIONS
    seed_dirs: dict[str, Path] = {}
    outcome: dict[str, Path | str] = {}
    problems: dict[str, list[str]] = {}
    for combo in combos:
        refused_at_verify = verify_problems(combo, variants[combo.version])
        outcome[combo.id] = delivered = deliver(combo, variants[combo.version], tmp_path / "seeds", seed_dirs)
        if bool(refused_at_verify) != isinstance(delivered, str):
            problems[combo.id] = [f"verify says {refused_at_verify or 'fine'}, create says "
                                  f"{delivered if isinstance(delivered, str) else 'fine'}"]
    kinds = {c.id: "configdrive" if c.delivery == "config-2" else "nocloud" for c in combos}
    cases = {os.fspath(p): (kinds[cid], p) for cid, p in outcome.items() if isinstance(p, Path)}
    results = read_with_cloud_init(cases, tmp_path / "cloud-init")
    refused = 0
    for combo in combos:
        delivered = outcome[combo.id]
        # The one rule (seed/network.py check_dns_parameters): search domains need a server.
        must_refuse = combo.network != "none" and combo.search != "none" and combo.nameservers == "none"
        if isinstance(delivered, str) != must_refuse:
            problems.setdefault(combo.id, []).append(f"refused: {delivered if isinstance(delivered, str) else 'no'}")
        if isinstance(delivered, str):
            refused += 1
            continue
        found = check(combo, results[os.fspath(delivered)])
        if found:
            problems.setdefault(combo.id, []).extend(found)
    summary = Counter(p.split(":")[0] + ":" + p.split(":")[1] for found in problems.values() for p in found)
    listing = "\n".join(f"{cid}\n    " + "\n    ".join(found) for cid, found in list(problems.items())[:30])
    assert not problems, (f"{len(problems)} of {len(combos)} combinations wrong ({refused} refused); "
                          f"by kind: {dict(summary.most_common(12))}\n{listing}")
