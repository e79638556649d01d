"""What the guest agent is told at first boot, as data: pure functions, no disks.

``seed_input()`` gathers everything from the Ganeti environment, the variant and the OS
parameters once (validating as it goes); ``build_nocloud()`` and
``configdrive.build_configdrive()`` turn it into files.  Writing them into the guest filesystem
or onto a cidata/config-2 drive is the delivery step's business.

Instance-id policy: on a first install it is INSTANCE_UUID itself, so ``cloud-init query
instance_id`` shows the Ganeti UUID.  Ganeti's reinstall passes INSTANCE_REINSTALL=1 but no
counter, and cloud-init re-runs its per-instance modules only when the id changes, so a
reinstall gets ``uuid5(INSTANCE_UUID, "reinstall <time_ns>-<random>")``: still a UUID (the
config drive's ``uuid`` field), new every time, derivable from nothing but the moment.  A rename
keeps the id (``read_instance_id`` + ``dataclasses.replace``) so that only the hostname changes.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from instance_cloudimage.ganeti.env import GanetiEnv, Instance
from instance_cloudimage.ganeti.variants import SEEDS, Variant
from instance_cloudimage.runtime.errors import ParameterError, SeedError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.flamingoconfig import parse_flamingo_user_data
from instance_cloudimage.seed.metad import has_metad, metad_cloud_config, refresh_requested
from instance_cloudimage.seed.network import (
    NETWORK_MODES,
    NetworkPlan,
    check_dns_parameters,
    plan_network,
    render_v1,
    render_v2,
)
from instance_cloudimage.seed.sshkeys import PublicKey, parse_authorized_keys
from instance_cloudimage.seed.userdata import (
    UserData,
    assemble_for_cloud_init,
    decode_user_data,
    load_guest_mapping,
)
from instance_cloudimage.seed.values import (
    HostName,
    parse_choice,
    parse_hostname,
    parse_nameservers,
    parse_password_hash,
    parse_search,
)


@dataclass(frozen=True)
class SeedInput:
    """Everything the builders need, validated."""

    instance: Instance
    variant: Variant
    params: Mapping[str, str]
    hostname: HostName
    instance_id: str
    ssh_keys: tuple[PublicKey, ...] = ()
    password_hash: str | None = None
    user_data: UserData | None = None
    dns_nameservers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    network: str = "auto"
    seed: str = "auto"
    default_user: str | None = None
    metad_refresh: bool = False  # install the guest unit that applies metad's parameters (seed/metad.py)

    @property
    def agent(self) -> str:
        return self.variant.agent

    @property
    def network_config_version(self) -> int:
        return self.variant.network_config_version

    @property
    def fqdn(self) -> str | None:
        return self.hostname.fqdn


@dataclass(frozen=True)
class SeedFiles:
    """Relative path → content, for a seed directory or a drive."""

    files: Mapping[str, bytes]


def derive_instance_id(instance: Instance, nonce: str | None = None) -> str:
    """INSTANCE_UUID on first install, a fresh UUID derived from it on reinstall."""
    base = instance.uuid or str(uuid.uuid5(uuid.NAMESPACE_DNS, instance.name))
    if not instance.reinstall:
        return base
    try:
        namespace = uuid.UUID(base)
    except ValueError:
        namespace = uuid.uuid5(uuid.NAMESPACE_URL, base)
    if nonce is None:
        nonce = f"{time.time_ns()}-{secrets.token_hex(8)}"
    return str(uuid.uuid5(namespace, f"reinstall {nonce}"))


def read_instance_id(meta_data: bytes) -> str | None:
    """The instance-id in an existing NoCloud ``meta-data`` or config-drive ``meta_data.json``
    (JSON is YAML), for a rename; None if there is none."""
    md = load_guest_mapping(meta_data)
    if md is None:
        return None
    value = md.get("instance-id") or md.get("uuid")
    return str(value) if value else None


def _hostname(instance: Instance, params: Mapping[str, str]) -> HostName:
    if params.get("hostname", "").strip():
        return parse_hostname(params["hostname"])
    try:
        return parse_hostname(instance.name)
    except ParameterError:
        raise SeedError(f"instance name {instance.name!r} is not a valid host name for the guest (RFC 1123)",
                        "set the hostname OS parameter") from None


def _default_user(variant: Variant) -> str | None:
    return variant.default_user or ("root" if variant.agent == "flamingo" else None)


def _check_against_variant(variant: Variant, password: bool, user_data: UserData | None) -> None:
    if password and not _default_user(variant):
        raise SeedError(f"variant {variant.name} does not name its image's default user, so password_hash "
                        "cannot be applied", "set DefaultUser in the variant's [Variant] section")
    if variant.agent == "flamingo":
        # The keys the host applies for flamingo, and one line naming any other (seed/flamingoconfig.py).
        parse_flamingo_user_data(user_data)


def check_variant_parameters(params: Mapping[str, str], variant: Variant) -> list[str]:
    """What ``verify`` can check once it knows the variant: one message per problem.  The
    parameters themselves are assumed to have passed params.validate_parameters."""
    try:
        user_data = decode_user_data(params.get("user_data", ""))
        _check_against_variant(variant, bool(params.get("password_hash", "").strip()), user_data)
        check_dns_parameters(params.get("network") or "auto", parse_nameservers(params.get("dns_nameservers", "")),
                             parse_search(params.get("dns_search", "")))
    except (ParameterError, SeedError) as e:
        return [str(e)]
    return []


def seed_input(genv: GanetiEnv, variant: Variant, *, nonce: str | None = None,
               site: SiteConfig | None = None) -> SeedInput:
    """Validate and gather the seed's input; ``site`` gives the site's defaults (built-in ones
    without it).  Raises ParameterError or SeedError."""
    instance = genv.require_instance()
    p = genv.params
    keys = parse_authorized_keys(p["ssh_authorized_keys"]) if p.get("ssh_authorized_keys", "").strip() else ()
    password = parse_password_hash(p["password_hash"]) if p.get("password_hash", "").strip() else None
    user_data = decode_user_data(p.get("user_data", ""))
    _check_against_variant(variant, password is not None, user_data)
    default_user = _default_user(variant)
    network = parse_choice("network", p.get("network") or "auto", NETWORK_MODES)
    seed = parse_choice("seed", p.get("seed") or variant.seed, SEEDS)
    nameservers, search = parse_nameservers(p.get("dns_nameservers", "")), parse_search(p.get("dns_search", ""))
    check_dns_parameters(network, nameservers, search)
    return SeedInput(
        instance=instance,
        variant=variant,
        params=p,
        hostname=_hostname(instance, p),
        instance_id=derive_instance_id(instance, nonce),
        ssh_keys=keys,
        password_hash=password,
        user_data=user_data,
        dns_nameservers=nameservers,
        dns_search=search,
        network=network,
        seed=seed,
        default_user=default_user,
        metad_refresh=variant.agent == "cloud-init" and has_metad(instance)
        and refresh_requested(p, bool(site.get("metad_refresh")) if site is not None else True),
    )


# --- shared pieces ----------------------------------------------------------------------------

def network_plan(inp: SeedInput) -> NetworkPlan | None:
    return plan_network(inp.instance.nics, inp.network, inp.dns_nameservers, inp.dns_search)


def cloud_init_config(inp: SeedInput) -> dict[str, Any]:
    """Our cloud-config for cloud-init.  Host name and keys travel in the metadata instead
    (rename then rewrites only that, and the user's cloud-config cannot drop our keys)."""
    cfg: dict[str, Any] = {"manage_etc_hosts": "localhost"}
    if inp.password_hash:
        # 'user' overrides the distro's default_user: any crypt hash works (unlike 'password',
        # which cloud-init 22.4 takes for a hash only for $1/$2a/$2y/$5/$6), and lock_passwd
        # must be off or cloud-init locks the account right after setting it.
        cfg["user"] = {"name": inp.default_user, "hashed_passwd": inp.password_hash, "lock_passwd": False}
    if inp.metad_refresh:
        cfg.update(metad_cloud_config(inp.default_user, inp.hostname.full, [k.line for k in inp.ssh_keys]))
    return cfg


def dump_yaml(data: Any) -> bytes:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1 << 16).encode()


def render_network_config(inp: SeedInput) -> bytes | None:
    plan = network_plan(inp)
    if plan is None:
        return None
    # Without the optional top-level 'network:' key: every cloud-init version reads that form.
    return dump_yaml(render_v1(plan) if inp.network_config_version == 1 else render_v2(plan))


def render_meta_data(inp: SeedInput) -> bytes:
    md: dict[str, Any] = {"instance-id": inp.instance_id, "local-hostname": inp.hostname.full}
    if inp.ssh_keys:
        md["public-keys"] = [k.line for k in inp.ssh_keys]
    return dump_yaml(md)


def build_nocloud(inp: SeedInput) -> SeedFiles:
    """NoCloud seed: meta-data, user-data, network-config (unless network=none), vendor-data
    (only when the user's data is opaque to cloud-init)."""
    out = assemble_for_cloud_init(cloud_init_config(inp), inp.user_data)
    files = {"meta-data": render_meta_data(inp), "user-data": out.user_data.encode()}
    if out.vendor_data is not None:
        files["vendor-data"] = out.vendor_data.encode()
    net = render_network_config(inp)
    if net is not None:
        files["network-config"] = net
    return SeedFiles(files)


def rename_seed_input(inp: SeedInput, existing_meta_data: bytes | None) -> SeedInput:
    """The input for a rename: the new host name, the instance-id the guest already has."""
    old = read_instance_id(existing_meta_data) if existing_meta_data else None
    return replace(inp, instance_id=old) if old else inp
