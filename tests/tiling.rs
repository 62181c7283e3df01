//! Fused tiling: tiled runs equal the untiled run (within 1e-5 of the largest output) on
//! YOLOv2's first 16 layers and on shared real models, for grids that divide the feature
//! map and grids that do not, stride-2 and dilated convolutions, SAME pools and several
//! groups.

mod common;
use common::*;
use memaflow::model::Package;
use memaflow::model::graph::*;
use memaflow::model::tflite::{WriteOptions, write_graph};
use memaflow::runtime::{FloatTensor, Plan, npy, run_layerwise};
use memaflow::tiling::execute::{TiledStats, batches, run_group};
use memaflow::tiling::group::Group;
use memaflow::tiling::predictor::{CALIBRATION, Predictor};
use memaflow::tiling::search::{Space, search};
use memaflow::tiling::{TilingConfig, load_group, run_tiled};
use std::sync::OnceLock;

const TOLERANCE: f64 = 1e-5;

fn yolo() -> &'static Package {
    static PKG: OnceLock<Package> = OnceLock::new();
    PKG.get_or_init(|| {
        let dir = scratch("tiling-zoo");
        cli_ok(&["zoo", "--out", dir.to_str().unwrap(), "--only", "yolov2_16"]);
        Package::open(dir.join("yolov2_16")).unwrap()
    })
}

/// Runs `configs` and checks each against the layer-by-layer run.
fn check_configs(pkg: &Package, input: &FloatTensor, configs: &[&str]) {
    let want = run_layerwise(pkg, input).unwrap().outputs;
    for text in configs {
        let config: TilingConfig = text.parse().unwrap();
        let got = run_tiled(pkg, input.clone(), &config)
            .unwrap_or_else(|e| panic!("{} {text}: {e:#}", pkg.name()));
        assert!(
            config.groups.is_empty() || got.stats.tiles > 1,
            "{text}: nothing was tiled"
        );
        assert!(
            got.stats.plans >= config.slices.values().sum::<usize>(),
            "{text}: fewer plans than slices"
        );
        assert_eq!(got.outputs.len(), want.len());
        for (k, (g, w)) in got.outputs.iter().zip(&want).enumerate() {
            assert_eq!(g.shape, w.shape, "{} {text}: output {k}", pkg.name());
            let err = relative_error(g, w);
            assert!(
                err <= TOLERANCE,
                "{} {text}: output {k} differs by {err:e} of its largest value",
                pkg.name()
            );
        }
    }
}

#[test]
fn yolov2_tiles_equal_untiled() {
    let pkg = yolo();
    let input = random_tensor(&pkg.manifest.inputs[0].shape, 7, 0.0, 1.0);
    check_configs(
        pkg,
        &input,
        &[
            "0-0:2x2",
            // Non-dividing grids, stride-2 pools inside the group.
            "0-2:3x3",
            "0-1:5x7",
            // Two groups, the second after an untiled layer.
            "0-1:4x4,3-6:2x3",
            "0-4:8x8",
            // Output-channel slices, alone (256 channels in 3: uneven) and with groups.
            "8/3",
            "0-1:4x4,2/2,5/4,8/3,10/2",
        ],
    );
}

/// Slicing refuses layers whose ops after the convolution mix channels or hold constants.
#[test]
fn slicing_refuses_what_it_cannot_slice() {
    use memaflow::tiling::slice::sliceable_channels;
    let g = synthetic();
    let err = sliceable_channels(&g).unwrap_err().to_string();
    assert!(err.contains("does not work per channel"), "{err}");
    let (_, layer) = yolo().read_layer(2).unwrap();
    assert_eq!(sliceable_channels(&layer).unwrap(), 128);
}

/// A shared real model with stride-2 and depthwise convs, residual adds, channel padding
/// and max pools: its stem groups as far as tiling allows.
#[test]
fn face_detection_tiles_equal_untiled() {
    let dir = scratch("tiling-face");
    let pkg = Package::open(import_shared("face_detection_short_range", &dir)).unwrap();
    let input = random_tensor(&pkg.manifest.inputs[0].shape, 3, -1.0, 1.0);
    check_configs(
        &pkg,
        &input,
        &["0-2:3x3", "0-4:2x5", "0-6:4x4", "0-2:2x2,3-10:3x3"],
    );
}

/// A graph with what the zoo and the shared models lack: dilation, SAME max pools whose
/// padding would win against negative values if it were read as zero, SAME depthwise
/// convs of stride 2 on odd extents, a residual add and a VALID average pool.
fn synthetic() -> Graph {
    let mut g = Graph::default();
    let mut seed = 11;
    let mut weights = |g: &mut Graph, name: &str, shape: Vec<usize>| {
        seed += 1;
        let t = random_tensor(&shape, seed, -0.5, 0.5);
        g.add_tensor(Tensor::f32_constant(name, shape, &t.data))
    };
    let x = g.add_tensor(Tensor::activation("x", vec![1, 23, 19, 5], DType::F32));
    g.inputs = vec![x];
    let conv = |padding, stride: usize, dilation: usize| ConvParams {
        padding,
        stride: [stride; 2],
        dilation: [dilation; 2],
        activation: Activation::None,
    };
    let (w, b) = (
        weights(&mut g, "w1", vec![8, 3, 3, 5]),
        weights(&mut g, "b1", vec![8]),
    );
    let y = g
        .add_node(
            Op::Conv2d(conv(Padding::Same, 1, 2)),
            vec![x, w, b],
            &["dilated"],
        )
        .unwrap()[0];
    let pool = PoolParams {
        padding: Padding::Same,
        stride: [2, 2],
        filter: [3, 3],
        activation: Activation::None,
    };
    let y = g
        .add_node(Op::MaxPool2d(pool), vec![y], &["maxpool"])
        .unwrap()[0];
    let (w, b) = (
        weights(&mut g, "w2", vec![1, 3, 3, 8]),
        weights(&mut g, "b2", vec![8]),
    );
    let dw = Op::DepthwiseConv2d {
        conv: conv(Padding::Same, 2, 1),
        depth_multiplier: 1,
    };
    let y = g.add_node(dw, vec![y, w, b], &["dw"]).unwrap()[0];
    let (w, b) = (
        weights(&mut g, "w3", vec![8, 1, 1, 8]),
        weights(&mut g, "b3", vec![8]),
    );
    let z = g
        .add_node(
            Op::Conv2d(conv(Padding::Valid, 1, 1)),
            vec![y, w, b],
            &["pw"],
        )
        .unwrap()[0];
    let z = g
        .add_node(Op::LeakyRelu { alpha: 0.1 }, vec![z], &["leaky"])
        .unwrap()[0];
    let add = Op::Binary {
        kind: BinaryKind::Add,
        activation: Activation::None,
    };
    let z = g.add_node(add, vec![z, y], &["residual"]).unwrap()[0];
    let avg = PoolParams {
        padding: Padding::Valid,
        stride: [1, 1],
        filter: [2, 2],
        activation: Activation::Relu,
    };
    let z = g
        .add_node(Op::AvgPool2d(avg), vec![z], &["avgpool"])
        .unwrap()[0];
    g.outputs = vec![z];
    g.check_structure().unwrap();
    g
}

#[test]
fn synthetic_group_tiles_equal_the_whole_graph() {
    let graph = synthetic();
    let plan = Plan::from_tflite(write_graph(&graph, WriteOptions::default()).unwrap()).unwrap();
    let input = random_tensor(&[1, 23, 19, 5], 5, -1.0, 1.0);
    let want = plan
        .run_floats(std::slice::from_ref(&input))
        .unwrap()
        .remove(0);
    let group = Group::new(graph).unwrap();
    let [_, h, w, _] = group.output_shape();
    for (rows, cols) in [(1, 1), (2, 2), (3, 2), (h, 1), (2, w), (5, 4)] {
        let mut stats = TiledStats::default();
        let got = run_group(&group, rows, cols, &input, &mut stats).unwrap();
        let err = relative_error(&got, &want);
        assert!(err <= TOLERANCE, "{rows}x{cols}: differs by {err:e}");
        assert_eq!(stats.tiles, rows * cols);
    }
}

/// Inner tiles of a grid share one plan: a 6×6 grid over a map that it divides needs
/// corner, edge and inner geometries only.
#[test]
fn inner_tiles_share_a_plan() {
    let group = Group::new(synthetic()).unwrap();
    let [_, h, w, _] = group.output_shape();
    assert_eq!((h, w), (5, 4));
    let b = batches(&group, 1, 1).unwrap();
    assert_eq!(b.len(), 1);
    let pkg = yolo();
    let group = load_group(pkg, &(0..2)).unwrap();
    assert_eq!(group.output_shape(), [1, 104, 104, 64]);
    let b = batches(&group, 4, 4).unwrap();
    assert_eq!(b.len(), 9, "4×4 over 104×104: 3 row kinds × 3 column kinds");
    assert_eq!(b.iter().map(|b| b.len()).sum::<usize>(), 16);
}

/// The search's choice fits the budget the untiled run exceeds, `infer --tiling auto`
/// runs it and matches the untiled outputs, and impossible budgets are errors.
#[test]
fn search_and_cli_pick_a_fitting_configuration() {
    let pkg = yolo();
    let model = Predictor::new(pkg, CALIBRATION).unwrap();
    let untiled = model.predict(&TilingConfig::untiled()).unwrap();
    let budget = untiled.peak_bytes * 4 / 5;
    let choice = search(&model, budget, Space::default()).unwrap();
    assert!(!choice.config.groups.is_empty(), "{}", choice.config);
    assert!(choice.estimate.peak_bytes <= budget);
    let again = model.predict(&choice.config).unwrap();
    assert_eq!(
        (again.peak_bytes, again.flops, again.tiles),
        (
            choice.estimate.peak_bytes,
            choice.estimate.flops,
            choice.estimate.tiles
        )
    );
    assert!((again.secs / choice.estimate.secs - 1.0).abs() < 1e-9);
    // Below what tiling alone reaches (tract planning layers 8 and 10 whole), the search
    // slices them.
    let tight = search(&model, 16 << 20, Space::default()).unwrap();
    assert!(tight.estimate.peak_bytes <= 16 << 20);
    assert!(
        [8, 10].iter().all(|l| tight.config.slices.contains_key(l)),
        "{}",
        tight.config
    );
    let no_slices = Space {
        max_slices: 1,
        ..Space::default()
    };
    assert!(search(&model, 16 << 20, no_slices).is_err());
    let err = search(&model, 1 << 20, Space::default()).unwrap_err();
    assert!(err.to_string().contains("no configuration"), "{err:#}");

    let dir = scratch("tiling-cli");
    let p = pkg.dir.to_str().unwrap();
    let input = dir.join("in.npy");
    let x = random_tensor(&pkg.manifest.inputs[0].shape, 9, 0.0, 1.0);
    npy::write(&input, &x.shape, &x.data).unwrap();
    let budget = budget.to_string();
    let plan = cli_ok(&["tile", "plan", p, "--budget", &budget]);
    assert!(
        plan.contains(&format!("--tiling {}", choice.config)),
        "{plan}"
    );
    let infer = |extra: &[&str], out: &str| -> serde_json::Value {
        let out = dir.join(out);
        let mut args = vec![
            "infer",
            "--model",
            p,
            "--input-npy",
            input.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--npy-out", out.to_str().unwrap()]);
        serde_json::from_str(&cli_ok(&args)).unwrap()
    };
    let auto = infer(&["--tiling", "auto", "--budget", &budget], "auto");
    assert_eq!(auto["mode"], "tiled");
    assert_eq!(auto["tiling"]["config"], choice.config.to_string());
    // A budget alone tiles only when the untiled run would not fit it.
    let implicit = infer(&["--budget", &budget], "implicit");
    assert_eq!(implicit["tiling"]["config"], choice.config.to_string());
    let roomy = infer(&["--budget", "1G"], "roomy");
    assert_eq!(roomy["mode"], "layers");
    let off = infer(&["--tiling", "off"], "off");
    assert_eq!(off["mode"], "layers");
    let read = |d: &str| FloatTensor::from(npy::read(&dir.join(d).join("00.npy")).unwrap());
    let err = relative_error(&read("auto"), &read("off"));
    assert!(err <= TOLERANCE, "auto vs off: {err:e}");
    assert!(read("roomy").bit_identical(&read("off")));

    let out = run_cli(
        &[
            "infer",
            "--model",
            p,
            "--input-npy",
            input.to_str().unwrap(),
            "--tiling",
            "auto",
        ],
        std::time::Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --budget"));
}

/// `batch` and the spool daemon tile a package when one of its layers does not fit the
/// budget on its own (the default, `--tiling needed`), with outputs equal to the untiled
/// run; with `--tiling off` the same budget is refused, naming the layer.
#[test]
fn batch_and_daemon_tile_what_does_not_fit_the_budget() {
    let pkg = yolo();
    let p = pkg.dir.to_str().unwrap();
    let dir = scratch("tiling-batch");
    let shape = &pkg.manifest.inputs[0].shape;
    let x = random_tensor(shape, 11, 0.0, 1.0);
    let input = dir.join("in.npy");
    npy::write(&input, &x.shape, &x.data).unwrap();
    let want = run_layerwise(pkg, &x).unwrap().outputs;
    let budget = "20M";
    let batch = |extra: &[&str]| {
        let mut args = vec!["batch", "--models", p, "--input-npy"];
        args.extend([input.to_str().unwrap(); 2]);
        args.extend(["--budget", budget, "--parallel", "2"]);
        args.extend_from_slice(extra);
        run_cli(&args, std::time::Duration::from_secs(120))
    };
    let off = batch(&["--tiling", "off"]);
    assert!(!off.status.success());
    let err = String::from_utf8_lossy(&off.stderr);
    assert!(err.contains("more than the whole budget"), "{err}");

    let out = dir.join("out");
    let run = batch(&["--npy-out", out.to_str().unwrap()]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let config: TilingConfig = summary["tiled"]["yolov2_16"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(!config.is_untiled());
    assert!(summary["ledger_high_water_bytes"].as_u64().unwrap() <= 20 << 20);
    for k in ["00", "01"] {
        let got = FloatTensor::from(npy::read(&out.join(format!("{k}-yolov2_16/00.npy"))).unwrap());
        let err = relative_error(&got, &want[0]);
        assert!(err <= TOLERANCE, "inference {k}: {err:e}");
    }

    // Where every layer fits on its own with the activations it needs, `needed` runs
    // layer by layer; at 28M `auto` tiles (the untiled run is predicted at 31 MiB).
    let costs = memaflow::profile::estimate_package(pkg);
    let held = memaflow::runtime::held_bytes(pkg);
    let fits = costs
        .iter()
        .zip(&held)
        .map(|(c, h)| c.footprint() + h)
        .max()
        .unwrap();
    let tiled_at = |budget: &str, mode: &str| -> serde_json::Value {
        let out = run_cli(
            &[
                "batch",
                "--models",
                p,
                "--input-npy",
                input.to_str().unwrap(),
                "--budget",
                budget,
                "--tiling",
                mode,
            ],
            std::time::Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["tiled"].clone()
    };
    assert_eq!(
        tiled_at(&(fits + (1 << 20)).to_string(), "needed"),
        serde_json::json!({})
    );
    assert!(tiled_at("28M", "auto")["yolov2_16"].is_string());

    // The daemon decides once, at start-up, and says so in status.json.
    let spool = dir.join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let (h, w) = (shape[1] as u32, shape[2] as u32);
    let frame = image::RgbImage::from_fn(w, h, |c, r| {
        image::Rgb([
            (c * 7 % 256) as u8,
            (r * 5 % 256) as u8,
            ((c + r) % 256) as u8,
        ])
    });
    let frame_path = dir.join("frame.png");
    frame.save(&frame_path).unwrap();
    std::fs::copy(&frame_path, spool.join("incoming/frame.png")).unwrap();
    let config_path = dir.join("memaflow.toml");
    std::fs::write(
        &config_path,
        format!(
            "[spool]\nroot = \"spool\"\n[run]\nbudget = \"{budget}\"\nthreads = 1\n\
             [[model]]\npath = {p:?}\nreport = \"raw\"\n"
        ),
    )
    .unwrap();
    cli_ok(&["run", "--config", config_path.to_str().unwrap(), "--once"]);
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spool.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["models"][0]["tiling"], summary["tiled"]["yolov2_16"]);
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(spool.join("out/frame.png.json")).unwrap()).unwrap();
    let want_dir = dir.join("want");
    cli_ok(&[
        "infer",
        "--model",
        p,
        frame_path.to_str().unwrap(),
        "--tiling",
        "off",
        "--npy-out",
        want_dir.to_str().unwrap(),
    ]);
    let want = FloatTensor::from(npy::read(&want_dir.join("00.npy")).unwrap());
    let values: Vec<f32> = result["models"][0]["outputs"][0]["values"]
        .as_array()
        .unwrap_or_else(|| panic!("no raw values: {result}"))
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let got = FloatTensor::new(want.shape.clone(), values).unwrap();
    let err = relative_error(&got, &want);
    assert!(err <= TOLERANCE, "daemon vs infer: {err:e}");
}
