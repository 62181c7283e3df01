SUMMARY = "The default model packages of the memaflow appliance"
DESCRIPTION = "Face detection (short range), face landmarks, palm detection (lite) and \
               hand landmarks (lite), the published MediaPipe models, imported into \
               memaflow model packages at build time by models/build as \
               models/models.toml describes. Nothing is downloaded at run time."
HOMEPAGE = "https://github.com/memaflow/memaflow"
BUGTRACKER = "https://github.com/memaflow/memaflow/issues"
SECTION = "console/utils"
CVE_PRODUCT = ""
# The wheel's LICENSE (models/LICENSE.mediapipe, installed beside the packages) is
# Apache-2.0 with notices for parts of mediapipe these models do not contain.
LICENSE = "Apache-2.0"
# The wheel stays packed (unpack=0), so the licence text comes from the common licences.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

DEPENDS = "memaflow-native"

# The models come from the `mediapipe` wheel on PyPI, pinned by its SHA-256; models/build
# checks each model's own SHA-256 again.
SRC_URI = "https://files.pythonhosted.org/packages/2f/ee/2e9e730dc4d98c8a9541b57bad173bebddf0e4c78f179acc100248c58066/mediapipe-${PV}-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl;name=wheel;unpack=0"
SRC_URI[wheel.sha256sum] = "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4"

S = "${UNPACKDIR}"

# The manifest, the build script and the licence are the checkout's models/ (this layer
# sits in the checkout); their checksums are part of do_compile's signature.
MEMAFLOW_MODELS ?= "${@os.path.normpath(os.path.join(d.getVar('FILE_DIRNAME'), '../../../../models'))}"
do_compile[file-checksums] += "${MEMAFLOW_MODELS}/models.toml:True ${MEMAFLOW_MODELS}/build:True ${MEMAFLOW_MODELS}/LICENSE.mediapipe:True"

inherit allarch python3native

do_compile() {
    ${PYTHON} ${MEMAFLOW_MODELS}/build --manifest ${MEMAFLOW_MODELS}/models.toml \
        --from ${UNPACKDIR}/mediapipe-${PV}-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl \
        --memaflow memaflow --out ${B}/models
}

do_install() {
    install -d ${D}${datadir}/memaflow/models
    (cd ${B}/models && find . -type f ! -name '.*') | while read -r file; do
        install -D -m 0644 "${B}/models/$file" "${D}${datadir}/memaflow/models/$file"
    done
}

FILES:${PN} += "${datadir}/memaflow/models"

# Data for the target only: no native or nativesdk variant.
BBCLASSEXTEND = ""
