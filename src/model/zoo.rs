//! The benchmark workload: the research's five networks and the first 16 layers of YOLOv2,
//! with their published architectures and deterministic pseudo-random weights. They go
//! through the same normalisation and split as imported models.

use super::graph::*;
use super::normalise::normalise;
use super::package::{ColorOrder, Manifest, PackageMeta, Preprocess, ResizeMode, write_package};
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::path::Path;

/// One network of `memaflow zoo`: the research's architecture at its real size, with
/// deterministic pseudo-random weights (for timing and memory, never for its classes).
pub struct ZooEntry {
    /// The package name (`agenet`, …).
    pub name: &'static str,
    /// One line on the network and its source.
    pub about: &'static str,
    /// Weight size given in the research (MiB), where it gives one.
    pub paper_mib: Option<f64>,
    build: fn() -> Result<(Graph, Vec<String>)>,
}

/// The research's five networks and the first 16 layers of YOLOv2 (for tiling).
pub const ZOO: &[ZooEntry] = &[
    ZooEntry {
        name: "agenet",
        about: "AgeNet, Levi & Hassner 2015: 3 conv + 3 fc, 8 age groups",
        paper_mib: Some(43.5),
        build: agenet,
    },
    ZooEntry {
        name: "gendernet",
        about: "GenderNet, Levi & Hassner 2015: 3 conv + 3 fc, 2 classes",
        paper_mib: Some(43.5),
        build: gendernet,
    },
    ZooEntry {
        name: "facenet",
        about: "FaceNet (DDFD), Farfade et al. 2015: AlexNet, face / background",
        paper_mib: Some(217.0),
        build: facenet,
    },
    ZooEntry {
        name: "sos",
        about: "Salient Object Subitizing, Zhang et al. 2016: AlexNet, 0-4+ objects",
        paper_mib: Some(217.0),
        build: sos,
    },
    ZooEntry {
        name: "sos_googlenet",
        about: "Salient Object Subitizing on GoogLeNet (Szegedy et al. 2015)",
        paper_mib: Some(22.8),
        build: sos_googlenet,
    },
    ZooEntry {
        name: "yolov2_16",
        about: "YOLOv2 (Redmon & Farhadi 2016) layers 0-15 at 416x416, for tiling",
        paper_mib: None,
        build: yolov2_16,
    },
];

/// The zoo network named `name`; the error lists the names there are.
pub fn entry(name: &str) -> Result<&'static ZooEntry> {
    match ZOO.iter().find(|e| e.name == name) {
        Some(e) => Ok(e),
        None => bail!(
            "no zoo network '{name}' (known: {})",
            ZOO.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

impl ZooEntry {
    /// The normalised graph and the labels of its one output.
    pub fn graph(&self) -> Result<(Graph, Vec<String>, super::normalise::Rewrites)> {
        let (mut g, labels) = (self.build)()?;
        let mut report = normalise(&mut g)?;
        let n =
            super::split::split_large_fully_connected(&mut g, super::DEFAULT_MAX_LAYER_WEIGHTS)?;
        if n > 0 {
            report.insert("split-fully-connected", n);
        }
        Ok((g, labels, report))
    }

    /// Builds the network and writes it as a package in `dir` (normalised and split as an
    /// import would).
    pub fn write(&self, dir: &Path, replace: bool) -> Result<Manifest> {
        let (graph, labels, report) = self.graph()?;
        let caffe = self.name != "yolov2_16";
        let preprocess = if caffe {
            // Caffe's convention for these models: BGR, ImageNet mean subtracted, no scaling.
            Preprocess {
                resize: ResizeMode::Stretch,
                color: ColorOrder::Bgr,
                mean: vec![104.0, 117.0, 123.0],
                std: vec![1.0; 3],
            }
        } else {
            Preprocess::default()
        };
        let out_name = graph.tensors[graph.outputs[0]].name.clone();
        let meta = PackageMeta {
            name: self.name.to_string(),
            source: None,
            preprocess,
            labels: if labels.is_empty() {
                HashMap::new()
            } else {
                HashMap::from([(out_name, labels)])
            },
            normalisation: report
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        write_package(&graph, &meta, dir, replace)
    }
}

/// splitmix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn seeded(key: &str) -> Rng {
        // FNV-1a of the key, so each tensor's values depend only on its network and name.
        Rng(key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        }))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

/// Builds a network op by op; weights are He-uniform so activations keep their scale
/// through deep stacks of ReLUs.
struct Net {
    name: &'static str,
    g: Graph,
}

impl Net {
    fn new(name: &'static str, input: [usize; 4]) -> (Net, TensorId) {
        let mut g = Graph::default();
        let x = g.add_tensor(Tensor::activation("input", input.to_vec(), DType::F32));
        g.inputs = vec![x];
        (Net { name, g }, x)
    }

    fn weights(&mut self, tensor: &str, shape: Vec<usize>, fan_in: usize) -> TensorId {
        let n: usize = shape.iter().product();
        let bound = (6.0 / fan_in as f32).sqrt();
        let mut rng = Rng::seeded(&format!("{}/{}", self.name, tensor));
        let values: Vec<f32> = (0..n).map(|_| rng.unit() * bound).collect();
        self.g
            .add_tensor(Tensor::f32_constant(tensor, shape, &values))
    }

    fn bias(&mut self, tensor: &str, n: usize) -> TensorId {
        let mut rng = Rng::seeded(&format!("{}/{}", self.name, tensor));
        let values: Vec<f32> = (0..n).map(|_| rng.unit() * 0.01).collect();
        self.g
            .add_tensor(Tensor::f32_constant(tensor, vec![n], &values))
    }

    fn op(&mut self, op: Op, inputs: Vec<TensorId>, name: &str) -> Result<TensorId> {
        Ok(self.g.add_node(op, inputs, &[name])?[0])
    }

    fn channels(&self, x: TensorId) -> usize {
        *self.g.tensors[x].shape.last().expect("NHWC")
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        x: TensorId,
        out: usize,
        k: usize,
        stride: usize,
        padding: Padding,
        activation: Activation,
    ) -> Result<TensorId> {
        let cin = self.channels(x);
        let w = self.weights(
            &format!("{name}/weights"),
            vec![out, k, k, cin],
            k * k * cin,
        );
        let b = self.bias(&format!("{name}/bias"), out);
        let p = ConvParams {
            padding,
            stride: [stride; 2],
            dilation: [1, 1],
            activation,
        };
        self.op(Op::Conv2d(p), vec![x, w, b], name)
    }

    /// Caffe's `group`: the channels split into groups, each convolved on its own.
    fn grouped_conv(
        &mut self,
        name: &str,
        x: TensorId,
        out: usize,
        k: usize,
        groups: usize,
    ) -> Result<TensorId> {
        let shape = self.g.tensors[x].shape.clone();
        let per = shape[3] / groups;
        let mut parts = vec![];
        for gi in 0..groups {
            let begin = self.g.add_tensor(Tensor::i32_constant(
                format!("{name}/g{gi}/begin"),
                &[0, 0, 0, (gi * per) as i32],
            ));
            let size = self.g.add_tensor(Tensor::i32_constant(
                format!("{name}/g{gi}/size"),
                &[
                    shape[0] as i32,
                    shape[1] as i32,
                    shape[2] as i32,
                    per as i32,
                ],
            ));
            let part = self.op(Op::Slice, vec![x, begin, size], &format!("{name}/g{gi}/in"))?;
            parts.push(self.conv(
                &format!("{name}/g{gi}"),
                part,
                out / groups,
                k,
                1,
                Padding::Same,
                Activation::Relu,
            )?);
        }
        self.op(
            Op::Concatenation {
                axis: 3,
                activation: Activation::None,
            },
            parts,
            name,
        )
    }

    fn pool(
        &mut self,
        name: &str,
        x: TensorId,
        max: bool,
        k: usize,
        stride: usize,
        padding: Padding,
    ) -> Result<TensorId> {
        let p = PoolParams {
            padding,
            stride: [stride; 2],
            filter: [k; 2],
            activation: Activation::None,
        };
        self.op(
            if max {
                Op::MaxPool2d(p)
            } else {
                Op::AvgPool2d(p)
            },
            vec![x],
            name,
        )
    }

    /// Caffe LRN across channels (`local_size`, `alpha`, `beta`): TFLite's radius is half
    /// the window and its alpha is not divided by the window size.
    fn lrn(&mut self, name: &str, x: TensorId) -> Result<TensorId> {
        let (size, alpha, beta) = (5usize, 1e-4f32, 0.75f32);
        self.op(
            Op::LocalResponseNorm {
                radius: (size - 1) / 2,
                bias: 1.0,
                alpha: alpha / size as f32,
                beta,
            },
            vec![x],
            name,
        )
    }

    fn fc(
        &mut self,
        name: &str,
        x: TensorId,
        out: usize,
        activation: Activation,
    ) -> Result<TensorId> {
        let n: usize = self.g.tensors[x].elements();
        let x = if self.g.tensors[x].shape.len() != 2 {
            let shape = self.g.add_tensor(Tensor::i32_constant(
                format!("{name}/flatten_shape"),
                &[1, n as i32],
            ));
            self.op(Op::Reshape, vec![x, shape], &format!("{name}/flatten"))?
        } else {
            x
        };
        let w = self.weights(&format!("{name}/weights"), vec![out, n], n);
        let b = self.bias(&format!("{name}/bias"), out);
        self.op(
            Op::FullyConnected {
                activation,
                keep_num_dims: false,
            },
            vec![x, w, b],
            name,
        )
    }

    fn softmax(mut self, x: TensorId) -> Result<Graph> {
        let y = self.op(Op::Softmax { beta: 1.0 }, vec![x], "prob")?;
        self.g.outputs = vec![y];
        Ok(self.g)
    }
}

fn levi_hassner(name: &'static str, classes: usize) -> Result<Graph> {
    let (mut n, x) = Net::new(name, [1, 227, 227, 3]);
    let x = n.conv("conv1", x, 96, 7, 4, Padding::Valid, Activation::Relu)?;
    let x = n.pool("pool1", x, true, 3, 2, Padding::Same)?;
    let x = n.lrn("norm1", x)?;
    let x = n.conv("conv2", x, 256, 5, 1, Padding::Same, Activation::Relu)?;
    let x = n.pool("pool2", x, true, 3, 2, Padding::Same)?;
    let x = n.lrn("norm2", x)?;
    let x = n.conv("conv3", x, 384, 3, 1, Padding::Same, Activation::Relu)?;
    let x = n.pool("pool5", x, true, 3, 2, Padding::Same)?;
    let x = n.fc("fc6", x, 512, Activation::Relu)?;
    let x = n.fc("fc7", x, 512, Activation::Relu)?;
    let x = n.fc("fc8", x, classes, Activation::None)?;
    n.softmax(x)
}

fn agenet() -> Result<(Graph, Vec<String>)> {
    let labels = [
        "(0-2)", "(4-6)", "(8-12)", "(15-20)", "(25-32)", "(38-43)", "(48-53)", "(60-100)",
    ];
    Ok((
        levi_hassner("agenet", 8)?,
        labels.map(String::from).to_vec(),
    ))
}

fn gendernet() -> Result<(Graph, Vec<String>)> {
    Ok((
        levi_hassner("gendernet", 2)?,
        vec!["male".into(), "female".into()],
    ))
}

/// AlexNet as in Caffe's bvlc_alexnet, with its two-group convolutions.
fn alexnet(name: &'static str, classes: usize) -> Result<Graph> {
    let (mut n, x) = Net::new(name, [1, 227, 227, 3]);
    let x = n.conv("conv1", x, 96, 11, 4, Padding::Valid, Activation::Relu)?;
    let x = n.lrn("norm1", x)?;
    let x = n.pool("pool1", x, true, 3, 2, Padding::Valid)?;
    let x = n.grouped_conv("conv2", x, 256, 5, 2)?;
    let x = n.lrn("norm2", x)?;
    let x = n.pool("pool2", x, true, 3, 2, Padding::Valid)?;
    let x = n.conv("conv3", x, 384, 3, 1, Padding::Same, Activation::Relu)?;
    let x = n.grouped_conv("conv4", x, 384, 3, 2)?;
    let x = n.grouped_conv("conv5", x, 256, 3, 2)?;
    let x = n.pool("pool5", x, true, 3, 2, Padding::Valid)?;
    let x = n.fc("fc6", x, 4096, Activation::Relu)?;
    let x = n.fc("fc7", x, 4096, Activation::Relu)?;
    let x = n.fc("fc8", x, classes, Activation::None)?;
    n.softmax(x)
}

fn facenet() -> Result<(Graph, Vec<String>)> {
    Ok((
        alexnet("facenet", 2)?,
        vec!["background".into(), "face".into()],
    ))
}

fn subitizing_labels() -> Vec<String> {
    ["0", "1", "2", "3", "4+"].map(String::from).to_vec()
}

fn sos() -> Result<(Graph, Vec<String>)> {
    Ok((alexnet("sos", 5)?, subitizing_labels()))
}

fn sos_googlenet() -> Result<(Graph, Vec<String>)> {
    let (mut n, x) = Net::new("sos_googlenet", [1, 224, 224, 3]);
    let x = n.conv("conv1/7x7_s2", x, 64, 7, 2, Padding::Same, Activation::Relu)?;
    let x = n.pool("pool1/3x3_s2", x, true, 3, 2, Padding::Same)?;
    let x = n.lrn("pool1/norm1", x)?;
    let x = n.conv(
        "conv2/3x3_reduce",
        x,
        64,
        1,
        1,
        Padding::Same,
        Activation::Relu,
    )?;
    let x = n.conv("conv2/3x3", x, 192, 3, 1, Padding::Same, Activation::Relu)?;
    let x = n.lrn("conv2/norm2", x)?;
    let mut x = n.pool("pool2/3x3_s2", x, true, 3, 2, Padding::Same)?;
    // (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) per module.
    let modules: [(&str, [usize; 6]); 9] = [
        ("3a", [64, 96, 128, 16, 32, 32]),
        ("3b", [128, 128, 192, 32, 96, 64]),
        ("4a", [192, 96, 208, 16, 48, 64]),
        ("4b", [160, 112, 224, 24, 64, 64]),
        ("4c", [128, 128, 256, 24, 64, 64]),
        ("4d", [112, 144, 288, 32, 64, 64]),
        ("4e", [256, 160, 320, 32, 128, 128]),
        ("5a", [256, 160, 320, 32, 128, 128]),
        ("5b", [384, 192, 384, 48, 128, 128]),
    ];
    for (m, c) in modules {
        let p = |s: &str| format!("inception_{m}/{s}");
        let relu = Activation::Relu;
        let b1 = n.conv(&p("1x1"), x, c[0], 1, 1, Padding::Same, relu)?;
        let r3 = n.conv(&p("3x3_reduce"), x, c[1], 1, 1, Padding::Same, relu)?;
        let b3 = n.conv(&p("3x3"), r3, c[2], 3, 1, Padding::Same, relu)?;
        let r5 = n.conv(&p("5x5_reduce"), x, c[3], 1, 1, Padding::Same, relu)?;
        let b5 = n.conv(&p("5x5"), r5, c[4], 5, 1, Padding::Same, relu)?;
        let pool = n.pool(&p("pool"), x, true, 3, 1, Padding::Same)?;
        let bp = n.conv(&p("pool_proj"), pool, c[5], 1, 1, Padding::Same, relu)?;
        x = n.op(
            Op::Concatenation {
                axis: 3,
                activation: Activation::None,
            },
            vec![b1, b3, b5, bp],
            &p("output"),
        )?;
        if m == "3b" || m == "4e" {
            x = n.pool(
                &format!("pool{}/3x3_s2", &m[..1]),
                x,
                true,
                3,
                2,
                Padding::Same,
            )?;
        }
    }
    let x = n.pool("pool5/7x7_s1", x, false, 7, 1, Padding::Valid)?;
    let x = n.fc("loss3/classifier", x, 5, Activation::None)?;
    Ok((n.softmax(x)?, subitizing_labels()))
}

fn yolov2_16() -> Result<(Graph, Vec<String>)> {
    let (mut n, mut x) = Net::new("yolov2_16", [1, 416, 416, 3]);
    // Darknet's yolov2.cfg, layers 0-15; batch norm folded into the conv bias.
    let layers: [(usize, usize); 16] = [
        (32, 3),
        (0, 0),
        (64, 3),
        (0, 0),
        (128, 3),
        (64, 1),
        (128, 3),
        (0, 0),
        (256, 3),
        (128, 1),
        (256, 3),
        (0, 0),
        (512, 3),
        (256, 1),
        (512, 3),
        (256, 1),
    ];
    for (i, &(filters, k)) in layers.iter().enumerate() {
        x = if filters == 0 {
            n.pool(&format!("layer{i}/maxpool"), x, true, 2, 2, Padding::Valid)?
        } else {
            let c = n.conv(
                &format!("layer{i}/conv"),
                x,
                filters,
                k,
                1,
                Padding::Same,
                Activation::None,
            )?;
            n.op(
                Op::LeakyRelu { alpha: 0.1 },
                vec![c],
                &format!("layer{i}/leaky"),
            )?
        };
    }
    n.g.outputs = vec![x];
    Ok((n.g, vec![]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_uniform_in_unit_interval() {
        let mut r = Rng::seeded("x");
        let v: Vec<f32> = (0..10000).map(|_| r.unit()).collect();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }
}
