SUMMARY = "A minimal image that boots into the memaflow appliance"
DESCRIPTION = "core-image-minimal plus the memaflow daemon, which starts at boot and \
               processes the frames that arrive in /var/spool/memaflow/incoming."
HOMEPAGE = "https://github.com/memaflow/memaflow"
BUGTRACKER = "https://github.com/memaflow/memaflow/issues"
SECTION = "images"
# The image is no product of its own: CVEs are tracked per package.
CVE_PRODUCT = ""
LICENSE = "MIT"

IMAGE_INSTALL = "packagegroup-core-boot packagegroup-memaflow ${CORE_IMAGE_EXTRA_INSTALL}"
IMAGE_LINGUAS = ""

inherit core-image

# Models and frames take space: leave room for them on the root file system.
IMAGE_ROOTFS_EXTRA_SPACE = "524288"
