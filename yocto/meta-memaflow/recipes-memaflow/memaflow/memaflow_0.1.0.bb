SUMMARY = "Runs several neural networks on every camera frame, layer by layer"
DESCRIPTION = "memaflow loads and executes neural networks layer by layer under a \
               memory-aware scheduler, so that models larger than the free memory of \
               the board still run. This recipe builds the daemon from the source tree \
               that holds this layer and installs it with its configuration (the \
               default pipeline), service files and board defaults."
HOMEPAGE = "https://github.com/memaflow/memaflow"
BUGTRACKER = "https://github.com/memaflow/memaflow/issues"
SECTION = "console/utils"
CVE_PRODUCT = "memaflow"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://LICENSE;md5=80a0fc0c0aadcb0a55547bdcb0d62113"

# The source is the checkout this layer sits in (externalsrc, below). SRC_URI holds the
# crates Cargo.lock pins (memaflow-crates.inc, from yocto/gen-crates-inc) and the files
# the recipe adds.
require memaflow-crates.inc

SRC_URI += "\
    file://memaflow-memory.conf \
    file://memaflow-publish.service \
    file://memaflow-publish.toml \
    file://memaflow-tmpfiles.conf \
    file://memaflow.init \
    file://memaflow.service \
    file://memaflow.toml \
    file://run-ptest \
"

inherit cargo cargo-update-recipe-crates externalsrc ptest systemd update-rc.d useradd

# Four levels up from recipes-memaflow/memaflow: the top of the memaflow checkout.
# Set EXTERNALSRC:pn-memaflow in local.conf to build another tree, or EXTERNALSRC = ""
# with a git SRC_URI and SRCREV in a bbappend to build a released commit.
EXTERNALSRC ?= "${@os.path.normpath(os.path.join(d.getVar('FILE_DIRNAME'), '../../../..'))}"

# As board/build-firmware: without the default `bench` feature (memaflow bench and its
# cgroups-rs, plotters and indicatif: 0.9 MiB the appliance does not need), and without
# `publish` (MQTT and TLS: 1.5 MiB) unless PACKAGECONFIG has it; the layer's
# configuration fragment memaflow/publish turns it on (docs/publish.md).
PACKAGECONFIG ??= ""
PACKAGECONFIG[publish] = ""
# EXTRA_CARGO_FLAGS is oe-core cargo.bbclass's; oelint-adv's variable list lacks it.
# nooelint: oelint.vars.mispell
EXTRA_CARGO_FLAGS = "--no-default-features ${@bb.utils.contains('PACKAGECONFIG', 'publish', '--features publish', '', d)}"

# The broker of the [publish] section appended to memaflow.toml with the publish feature.
MEMAFLOW_PUBLISH_HOST ??= "mqtt.local"

# systemd MemoryMax of the service: a size (1536M) or a share of physical memory, so
# that one value suits every RAM size of a board. memaflow reads it as the cgroup limit.
MEMAFLOW_MEMORY_MAX ??= "85%"

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system memaflow"
USERADD_PARAM:${PN} = "--system --gid memaflow --home-dir ${localstatedir}/spool/memaflow \
                       --no-create-home --shell ${base_sbindir}/nologin memaflow"

# systemd.bbclass fails on a listed unit that is not installed: publish's only with it.
SYSTEMD_PACKAGES = "${PN} ${@bb.utils.contains('PACKAGECONFIG', 'publish', '${PN}-publish', '', d)}"
SYSTEMD_SERVICE:${PN} = "memaflow.service"
SYSTEMD_SERVICE:${PN}-publish = "memaflow-publish.service"
INITSCRIPT_NAME = "memaflow"
INITSCRIPT_PARAMS = "defaults 90 10"

# On the target: the daemon with its configuration, spool, services and data. The native
# variant is the command alone, for recipes that import models at build time.
do_install:append:class-target() {
    # The default configuration runs the default pipeline (models/pipeline.toml) on the
    # packages of memaflow-models.
    install -d ${D}${sysconfdir}/memaflow
    cat ${UNPACKDIR}/memaflow.toml ${S}/models/pipeline.toml >${D}${sysconfdir}/memaflow/memaflow.toml
    chmod 0644 ${D}${sysconfdir}/memaflow/memaflow.toml

    # The spool: only the daemon's user writes; producers in group memaflow drop
    # frames into incoming/.
    install -d -m 0750 -o memaflow -g memaflow ${D}${localstatedir}/spool/memaflow
    install -d -m 2770 -o memaflow -g memaflow ${D}${localstatedir}/spool/memaflow/incoming

    # Board defaults from the checkout. The model packages are memaflow-models'.
    install -d ${D}${datadir}/memaflow/boards
    for board in ${S}/board/*.toml; do
        [ -f "$board" ] || continue
        install -m 0644 "$board" ${D}${datadir}/memaflow/boards/
    done

    # Both init systems; systemd.bbclass drops the one the distro does not use.
    install -d ${D}${sysconfdir}/init.d
    install -m 0755 ${UNPACKDIR}/memaflow.init ${D}${sysconfdir}/init.d/memaflow
    install -d ${D}${systemd_system_unitdir}/memaflow.service.d
    install -m 0644 ${UNPACKDIR}/memaflow.service ${D}${systemd_system_unitdir}/memaflow.service
    install -m 0644 ${UNPACKDIR}/memaflow-memory.conf \
        ${D}${systemd_system_unitdir}/memaflow.service.d/memory.conf
    sed -i -e 's|@MEMAFLOW_MEMORY_MAX@|${MEMAFLOW_MEMORY_MAX}|' \
        ${D}${systemd_system_unitdir}/memaflow.service.d/memory.conf
    if ${@bb.utils.contains('PACKAGECONFIG', 'publish', 'true', 'false', d)}; then
        sed -e 's|@MEMAFLOW_PUBLISH_HOST@|${MEMAFLOW_PUBLISH_HOST}|' ${UNPACKDIR}/memaflow-publish.toml \
            >> ${D}${sysconfdir}/memaflow/memaflow.toml
        install -m 0644 ${UNPACKDIR}/memaflow-publish.service ${D}${systemd_system_unitdir}/
    fi
    if ${@bb.utils.contains('DISTRO_FEATURES', 'systemd', 'true', 'false', d)}; then
        install -d ${D}${nonarch_libdir}/tmpfiles.d
        install -m 0644 ${UNPACKDIR}/memaflow-tmpfiles.conf ${D}${nonarch_libdir}/tmpfiles.d/memaflow.conf
    fi
}

do_install_ptest() {
    sed -i -e 's|@PV@|${PV}|' ${D}${PTEST_PATH}/run-ptest
}

# memaflow-publish: the publisher's unit (the command is memaflow's). Empty, so not
# built, without the publish feature: an image is complete without it.
PACKAGE_BEFORE_PN = "${PN}-publish"
FILES:${PN}-publish += "${systemd_system_unitdir}/memaflow-publish.service"

FILES:${PN} += "\
    ${nonarch_libdir}/tmpfiles.d \
    ${systemd_system_unitdir}/memaflow.service.d \
"
CONFFILES:${PN} = "${sysconfdir}/memaflow/memaflow.toml"
RDEPENDS:${PN}-publish = "${PN}"
# The default configuration's models.
RDEPENDS:${PN}:append:class-target = " memaflow-models"

BBCLASSEXTEND = "native"
