"""``meshllm invite``: print the code another device joins this device's mesh with.

The key is the one ``meshllm up`` would use with the same options and ``MESHLLM_*`` variables
(daemon/net/meshkey.py): ``--mesh-key-file``, ``MESHLLM_MESH_KEY``, ``MESHLLM_INVITE``, else
the state dir's. Nothing is created: with no key yet, one line says what to do. stdout is one
line whose last word is the code (``meshllm invite | awk '{print $NF}'``); the rest goes to
stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from daemon.cli_common import EXIT_OK, EXIT_USAGE, fail
from daemon.invite import InviteError, invite_code, key_id, parse_invite
from daemon.net.meshkey import MESH_KEY_ENV, MESH_KEY_FILE, MeshKeyError, load_mesh_key, stored_mesh_key
from daemon.node.config import ConfigError, NodeConfig, env_name


def cmd_invite(args: argparse.Namespace) -> int:
    flags = {"state_dir": args.state_dir, "mesh_key_file": args.mesh_key_file}
    try:
        config = NodeConfig.from_sources(flags, os.environ)
    except ConfigError as error:
        return fail(str(error), EXIT_USAGE)
    if config.open_mesh:
        return fail(f"{env_name('open_mesh')} is set: `meshllm up` runs an open mesh, which anyone on this "
                    "network can join without a code; unset it to use a mesh key")
    state_dir = config.state_dir
    try:
        key = load_mesh_key(config.mesh_key_file, os.environ)
        where = (f"mesh key file {config.mesh_key_file}" if config.mesh_key_file is not None
                 else f"${MESH_KEY_ENV}")
        if key is None and config.invite is not None:
            key, where = parse_invite(config.invite), f"${env_name('invite')}"
        if key is None:
            key, where = stored_mesh_key(state_dir), str(state_dir / MESH_KEY_FILE)
    except (MeshKeyError, InviteError) as error:
        return fail(str(error))
    if key is None:
        return fail(f"no mesh key in {state_dir} yet: start this device's mesh once with `meshllm up` "
                    f"(it makes the key), or join another device's mesh with `meshllm up --invite CODE`"
                    f"{'' if args.state_dir is None else ' (with the same --state-dir)'}")
    print(f"meshllm: mesh key {key_id(key)} (from {where}). Anyone with this code can join your mesh: "
          "give it only to your own devices. On another device, run:", file=sys.stderr, flush=True)
    print(f"meshllm up --invite {invite_code(key)}", flush=True)
    return EXIT_OK
