# testimage cases for the memaflow appliance: TEST_SUITES += "memaflow".
#
# SPDX-License-Identifier: MIT

import os
import tempfile
import time

from oeqa.core.decorator.data import skipIfNotFeature
from oeqa.core.decorator.depends import OETestDepends
from oeqa.runtime.case import OERuntimeTestCase
from oeqa.runtime.decorator.package import OEHasPackage

CONFIG = "/etc/memaflow/memaflow.toml"
SPOOL = "/var/spool/memaflow"
MODELS = "/usr/share/memaflow/models"
# The models of the default configuration (models/pipeline.toml).
PIPELINE = ("face_detection_short_range", "face_landmark")


def ppm_ramp(width=64, height=48):
    """A binary PPM frame: a horizontal grey ramp."""
    row = bytes(v for x in range(width) for v in (x * 255 // (width - 1),) * 3)
    return b"P6\n%d %d\n255\n" % (width, height) + row * height


class MemaflowTest(OERuntimeTestCase):

    def run_ok(self, cmd, timeout=None):
        status, output = self.target.run(cmd, timeout)
        self.assertEqual(status, 0, msg="%s failed:\n%s" % (cmd, output))
        return output

    @OEHasPackage(["memaflow"])
    @OETestDepends(["ssh.SSHTest.test_ssh"])
    def test_memaflow_version(self):
        output = self.run_ok("memaflow --version")
        self.assertTrue(output.startswith("memaflow "), msg=output)

    @OETestDepends(["memaflow.MemaflowTest.test_memaflow_version"])
    def test_memaflow_installed_paths(self):
        self.run_ok("test -f %s" % CONFIG)
        for path, mode in ((SPOOL, "drwxr-x---"), (SPOOL + "/incoming", "drwxrws---")):
            fields = self.run_ok("ls -ld %s" % path).split()
            self.assertEqual((fields[0], fields[2], fields[3]), (mode, "memaflow", "memaflow"),
                             msg="%s: %s" % (path, " ".join(fields)))

    @skipIfNotFeature("systemd", "the hardened unit needs systemd")
    @OETestDepends(["memaflow.MemaflowTest.test_memaflow_installed_paths"])
    def test_memaflow_service(self):
        output = self.run_ok("systemctl show -p User -p NoNewPrivileges -p ProtectSystem "
                             "-p ReadWritePaths -p MemoryMax memaflow.service")
        props = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        self.assertEqual(props.get("User"), "memaflow", msg=output)
        self.assertEqual(props.get("NoNewPrivileges"), "yes", msg=output)
        self.assertEqual(props.get("ProtectSystem"), "strict", msg=output)
        self.assertEqual(props.get("ReadWritePaths"), SPOOL, msg=output)
        self.assertNotIn(props.get("MemoryMax"), (None, "infinity"), msg=output)
        self.run_ok("systemctl is-active memaflow.service")

    @skipIfNotFeature("systemd", "the round trip drives the systemd service")
    @OETestDepends(["memaflow.MemaflowTest.test_memaflow_service"])
    def test_memaflow_spool_round_trip(self):
        # The default pipeline's packages are installed; one frame written beside
        # incoming/ and renamed in, as producers should.
        for name in PIPELINE:
            self.run_ok("test -f %s/%s/model.toml" % (MODELS, name))
        with tempfile.TemporaryDirectory() as tmp:
            frame = os.path.join(tmp, "oeqa-frame.ppm")
            with open(frame, "wb") as f:
                f.write(ppm_ramp())
            self.target.copyTo(frame, "%s/.oeqa-frame.ppm" % SPOOL)
        self.run_ok("chown memaflow:memaflow %s/.oeqa-frame.ppm && "
                    "mv %s/.oeqa-frame.ppm %s/incoming/oeqa-frame.ppm" % (SPOOL, SPOOL, SPOOL))

        deadline = time.time() + 600
        while time.time() < deadline:
            status, output = self.target.run("ls %s/out %s/failed" % (SPOOL, SPOOL))
            if "oeqa-frame" in output:
                break
            time.sleep(5)
        status, failed = self.target.run("cat %s/failed/oeqa-frame*.error.json" % SPOOL)
        self.assertNotEqual(status, 0, msg="the frame failed:\n%s" % failed)
        output = self.run_ok("cat %s/out/oeqa-frame*.json" % SPOOL)
        for name in PIPELINE:
            self.assertIn('"%s"' % name, output)
        self.assertNotIn('"error"', output)
