"""Run a real OS script (create, rename) in this process, the way scripts/<verb> does.

usage: create_driver.py VERB SCRIPT_PATH   (the Ganeti environment comes from os.environ)

One test-only addition, outside the package: TEST_PAUSE_AFTER=module.function (e.g.
disk.mount.mount_device) makes that function print READY after it ran and then sleep, so a test can
SIGTERM the process while a loop device or mount is in place.
"""

import importlib
import os
import sys
import time

pause = os.environ.get("TEST_PAUSE_AFTER")
if pause:
    module_name, function_name = pause.rsplit(".", 1)
    module = importlib.import_module(f"instance_cloudimage.{module_name}")
    original = getattr(module, function_name)

    def paused(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(*args, **kwargs)
        print("READY", flush=True)
        time.sleep(120)
        return result

    setattr(module, function_name, paused)

from instance_cloudimage.scripts.main import os_script_main  # noqa: E402

sys.exit(os_script_main(sys.argv[1], environ=os.environ, argv=[sys.argv[2]]))
