//! A bad model directory is a clear `LoadError` naming what is wrong, never a panic.

use std::path::Path;
use worker::device_map::Placement;
use worker::model::{Dtype, GptJ, LoadError, LoadOptions};
use worker::tiny::{TinyConfig, write_tiny_model};

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_model(dir.path(), &TinyConfig::tiny(), 9).expect("writes");
    dir
}

fn load(dir: &Path) -> LoadError {
    GptJ::load(dir, &LoadOptions::default()).expect_err("must not load")
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(path, v.to_string()).expect("write");
}

#[test]
fn a_missing_directory_is_named() {
    let err = load(Path::new("/nonexistent/gpt-j"));
    assert!(matches!(err, LoadError::DirNotFound(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/gpt-j"));
}

#[test]
fn missing_files_are_named() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load(dir.path());
    assert!(matches!(err, LoadError::FileNotFound(_)), "{err}");
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );

    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).expect("rm");
    let err = load(dir.path());
    assert!(matches!(err, LoadError::NoCheckpoint(_)), "{err}");

    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    let err = load(dir.path());
    assert!(
        matches!(err, LoadError::FileNotFound(ref p) if p.ends_with("config.json")),
        "{err}"
    );
}

/// Rewrites a safetensors file without `name` (its bytes stay, unreferenced).
fn drop_tensor(shard: &Path, name: &str) {
    let bytes = std::fs::read(shard).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    assert!(
        header.as_object_mut().expect("object").remove(name).is_some(),
        "{name} is in {shard:?}"
    );
    let header = header.to_string().into_bytes();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(&bytes[8 + n..]);
    std::fs::write(shard, out).expect("write");
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tiny_dir();
    let name = "transformer.h.1.mlp.fc_out.bias";
    let index = dir.path().join("model.safetensors.index.json");
    let map: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).expect("index")).expect("json");
    let shard = map["weight_map"][name].as_str().expect("in the index");
    drop_tensor(&dir.path().join(shard), name);
    let err = load(dir.path());
    assert!(matches!(err, LoadError::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains(name), "{err}");

    // Also when the index does not list it.
    edit_json(&index, |v| {
        v["weight_map"].as_object_mut().expect("map").remove(name);
    });
    assert!(
        matches!(load(dir.path()), LoadError::MissingTensor { ref name } if name.contains("fc_out.bias"))
    );
}

#[test]
fn a_wrong_shape_names_both_shapes() {
    let dir = tiny_dir();
    edit_json(&dir.path().join("config.json"), |v| v["n_inner"] = 128.into());
    let err = load(dir.path());
    let text = err.to_string();
    assert!(matches!(err, LoadError::ShapeMismatch { .. }), "{text}");
    // The first MLP tensor in the shard's layout (safetensors orders tensors by name): fc_in's bias.
    assert!(
        text.contains("fc_in") && text.contains("[256]") && text.contains("[128]"),
        "{text}"
    );
}

#[test]
fn an_unknown_dtype_is_rejected() {
    let err = "float8".parse::<Dtype>().expect_err("no float8");
    assert!(
        matches!(err, LoadError::UnknownDtype(ref d) if d == "float8"),
        "{err}"
    );
}

#[test]
fn a_config_that_is_not_gpt_j_is_rejected() {
    let dir = tiny_dir();
    edit_json(&dir.path().join("config.json"), |v| {
        v["model_type"] = "gpt2".into()
    });
    let err = load(dir.path());
    assert!(
        matches!(err, LoadError::NotGptJ { ref model_type, .. } if model_type == "gpt2"),
        "{err}"
    );

    edit_json(&dir.path().join("config.json"), |v| {
        v["model_type"] = "gptj".into();
        v["n_head"] = 5.into();
    });
    let err = load(dir.path());
    assert!(
        matches!(err, LoadError::Config { .. }) && err.to_string().contains("n_head"),
        "{err}"
    );

    std::fs::write(dir.path().join("config.json"), "{not json").expect("write");
    assert!(matches!(load(dir.path()), LoadError::Config { .. }));
}

#[test]
fn a_bad_index_is_rejected() {
    let dir = tiny_dir();
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, "{\"weight_map\": 3}").expect("write");
    let err = load(dir.path());
    assert!(matches!(err, LoadError::BadIndex { .. }), "{err}");
    std::fs::write(
        &index,
        "{\"weight_map\": {\"lm_head.weight\": \"../../etc/passwd\"}}",
    )
    .expect("write");
    assert!(matches!(load(dir.path()), LoadError::BadIndex { .. }));
}

#[test]
fn a_corrupt_shard_is_rejected() {
    let dir = tiny_dir();
    let shard = dir.path().join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&shard).expect("read");
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = load(dir.path());
    assert!(matches!(err, LoadError::BadCheckpoint { .. }), "{err}");
    std::fs::write(&shard, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").expect("write");
    assert!(matches!(load(dir.path()), LoadError::BadCheckpoint { .. }));
}

#[test]
fn a_device_this_machine_lacks_is_rejected_at_load() {
    if tch::Cuda::device_count() > 7 {
        return;
    }
    let dir = tiny_dir();
    let opts = LoadOptions {
        placement: Placement::parse_device_map("cuda:7=0-2").expect("parses"),
        ..Default::default()
    };
    let err = GptJ::load(dir.path(), &opts).expect_err("no cuda:7");
    assert!(matches!(err, LoadError::DeviceUnavailable(_)), "{err}");
    assert!(err.to_string().contains("cuda:7"), "{err}");
}

#[test]
fn too_little_memory_is_an_error_at_start_up() {
    let dir = tiny_dir();
    let opts = LoadOptions {
        placement: Placement::parse_max_memory("cpu=10MB").expect("parses"),
        ..Default::default()
    };
    let err = GptJ::load(dir.path(), &opts).expect_err("26 MB do not fit in 10 MB");
    assert!(matches!(err, LoadError::NotEnoughMemory { .. }), "{err}");
}
