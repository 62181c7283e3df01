SUMMARY = "The default model packages of the memaflow appliance"
DESCRIPTION = "Face detection (short range), face landmarks, palm detection (lite) and \
               hand landmarks (lite), the published MediaPipe models, imported into \
               memaflow model packages at build time by models/build as \
               models/models.toml describes. Nothing is downloaded at run time."
HOMEPAGE = "https://github.com/memaflow/memaflow"
BUGTRACKER = "https://github.com/memaflow/memaflow/issues"
SECTION = "console/utils"
CVE_PRODUCT = ""
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${UNPACKDIR}/LICENSE.mediapipe;md5=87a30e5cfa12d1ab9ada4fb6f3feed4b"

# The manifest, the build script and the licence come from the checkout this layer sits
# in; the models from the `mediapipe` wheel on PyPI, pinned by its SHA-256 (models/build
# checks each model's own SHA-256 again).
FILESEXTRAPATHS:prepend := "${@os.path.normpath(os.path.join(d.getVar('FILE_DIRNAME'), '../../../../models'))}:"
SRC_URI = "\
    file://LICENSE.mediapipe \
    file://build \
    file://models.toml \
    https://files.pythonhosted.org/packages/2f/ee/2e9e730dc4d98c8a9541b57bad173bebddf0e4c78f179acc100248c58066/mediapipe-${PV}-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl;name=wheel;unpack=0 \
"
SRC_URI[wheel.sha256sum] = "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4"

S = "${UNPACKDIR}"

DEPENDS = "memaflow-native"

inherit allarch python3native

do_compile() {
    ${PYTHON} ${UNPACKDIR}/build --manifest ${UNPACKDIR}/models.toml \
        --from ${UNPACKDIR}/mediapipe-${PV}-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl \
        --memaflow memaflow --out ${B}/models
}

do_install() {
    install -d ${D}${datadir}/memaflow/models
    (cd ${B}/models && find . -type f ! -name '.*') | while read -r file; do
        install -D -m 0644 "${B}/models/$file" "${D}${datadir}/memaflow/models/$file"
    done
}

FILES:${PN} = "${datadir}/memaflow/models"
