SUMMARY = "memaflow appliance: the daemon and what it needs at run time"
DESCRIPTION = "Everything an image needs to run memaflow as a service: the daemon, its \
               configuration, board defaults and model packages, and its service files."
HOMEPAGE = "https://github.com/memaflow/memaflow"
BUGTRACKER = "https://github.com/memaflow/memaflow/issues"
SECTION = "console/utils"
LICENSE = "MIT"

inherit packagegroup

RDEPENDS:${PN} = "memaflow memaflow-models"
