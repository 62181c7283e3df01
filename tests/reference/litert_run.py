#!/usr/bin/env python3
"""Reference outputs from ai-edge-litert's reference kernels (no XNNPACK).

usage: litert_run.py MODEL.tflite OUT_DIR INPUT.npy [INPUT.npy ...]
Writes OUT_DIR/<k>/NN.npy for the k-th input, NN = position in the model's outputs.
"""
import os
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType


def main():
    model, out_dir, inputs = sys.argv[1], sys.argv[2], sys.argv[3:]
    interp = Interpreter(
        model_path=model,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    outs = interp.get_output_details()
    for k, path in enumerate(inputs):
        x = np.load(path).astype(np.float32)
        interp.set_tensor(inp["index"], x.reshape(inp["shape"]))
        interp.invoke()
        d = os.path.join(out_dir, str(k))
        os.makedirs(d, exist_ok=True)
        for n, o in enumerate(outs):
            np.save(os.path.join(d, "%02d.npy" % n), interp.get_tensor(o["index"]).astype("<f4"))


if __name__ == "__main__":
    main()
