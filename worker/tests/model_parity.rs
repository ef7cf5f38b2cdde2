//! The worker's GPT-J computes what transformers' `GPTJForCausalLM` computes.
//!
//! transformers (the Python reference, through `GPTJ_PYTHON`) writes random tiny checkpoints in each layout
//! published for GPT-J and its logits for a few prompts; the worker loads the same files and must agree
//! within 1e-4 relative (float32): `max |ours - theirs| <= 1e-4 * max |theirs|` over the vocabulary.

use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Kind, Tensor};
use worker::device_map::Placement;
use worker::lm::{CausalLm, KvCache, Logits};
use worker::model::{Dtype, GptJ, LoadOptions};

fn python() -> PathBuf {
    std::env::var_os("GPTJ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(name)
}

fn run_python(args: &[&str]) {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("the Python reference runs (set GPTJ_PYTHON)");
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn prompts() -> Vec<Vec<i64>> {
    vec![
        vec![15496, 995],
        vec![50256, 464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
        vec![7],
        (0..40).map(|i| (i * 1237 + 11) % 50400).collect(),
    ]
}

/// A checkpoint written by transformers in `format`, with its logits for [`prompts`].
fn hf_checkpoint(format: &str, seed: u64) -> (tempfile::TempDir, Vec<Vec<f32>>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let prompts = serde_json::to_string(&prompts()).expect("json");
    let seed = seed.to_string();
    let out = dir.path().to_str().expect("utf-8 path");
    run_python(&[
        script("make_hf_checkpoint.py").to_str().expect("path"),
        out,
        "--format",
        format,
        "--seed",
        &seed,
        "--prompts",
        &prompts,
    ]);
    let logits = std::fs::read_to_string(dir.path().join("hf_logits.json")).expect("logits written");
    (dir, serde_json::from_str(&logits).expect("logits json"))
}

/// Runs one prompt alone and returns the last position's logits.
fn last_logits(model: &GptJ, ids: &[i64]) -> Vec<f32> {
    let n = ids.len() as i64;
    let input = Tensor::from_slice(ids).view([1, n]);
    let mask = Tensor::ones([1, n], (Kind::Int64, tch::Device::Cpu));
    let pos = Tensor::arange(n, (Kind::Int64, tch::Device::Cpu)).view([1, n]);
    let mut cache = KvCache::new(model.info().n_layer);
    let out = model
        .forward(&input, &mask, &pos, &mut cache, Logits::LastOnly, false)
        .expect("forward");
    assert_eq!(out.logits.size(), [1, 1, model.info().vocab_size as i64]);
    Vec::<f32>::try_from(out.logits.flatten(0, -1)).expect("f32 logits")
}

fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: vocabulary sizes differ");
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("{what}: max |diff| {diff:e}, max |logit| {scale}");
    assert!(diff <= 1e-4 * scale, "{what}: max |diff| {diff} > 1e-4 * {scale}");
}

fn check_format(format: &str, seed: u64) {
    let (dir, reference) = hf_checkpoint(format, seed);
    let model = GptJ::load(dir.path(), &LoadOptions::default()).expect("loads");
    for (ids, theirs) in prompts().iter().zip(&reference) {
        assert_close(
            &last_logits(&model, ids),
            theirs,
            &format!("{format}, prompt of {} tokens", ids.len()),
        );
    }
}

#[test]
fn sharded_safetensors_from_transformers_give_its_logits() {
    check_format("safetensors-sharded", 1);
}

#[test]
fn single_safetensors_from_transformers_give_its_logits() {
    check_format("safetensors", 2);
}

#[test]
fn single_pytorch_bin_from_transformers_gives_its_logits() {
    check_format("bin", 3);
}

#[test]
fn sharded_pytorch_bin_from_transformers_gives_its_logits() {
    check_format("bin-sharded", 4);
}

#[test]
fn a_hand_made_bin_with_shared_storages_views_and_old_names_loads() {
    check_format("bin-views", 5);
}

#[test]
fn the_tiny_model_the_worker_writes_is_gpt_j_to_transformers_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    worker::tiny::write_tiny_model(dir.path(), &worker::tiny::TinyConfig::tiny(), 7).expect("writes");
    let out = dir.path().join("ref.json");
    let prompts = prompts();
    run_python(&[
        script("hf_logits.py").to_str().expect("path"),
        dir.path().to_str().expect("path"),
        &serde_json::to_string(&prompts).expect("json"),
        out.to_str().expect("path"),
    ]);
    let reference: Vec<Vec<f32>> =
        serde_json::from_str(&std::fs::read_to_string(out).expect("read")).expect("json");
    let model = GptJ::load(dir.path(), &LoadOptions::default()).expect("loads");
    for (ids, theirs) in prompts.iter().zip(&reference) {
        assert_close(&last_logits(&model, ids), theirs, "worker-written tiny model");
    }
}

#[test]
fn half_precision_loads_convert_and_stay_near_float32() {
    let dir = tempfile::tempdir().expect("temp dir");
    worker::tiny::write_tiny_model(dir.path(), &worker::tiny::TinyConfig::tiny(), 3).expect("writes");
    let f32_model = GptJ::load(dir.path(), &LoadOptions::default()).expect("loads");
    let ids = &prompts()[1];
    let reference = last_logits(&f32_model, ids);
    for dtype in [Dtype::BFloat16, Dtype::Float16] {
        let opts = LoadOptions {
            dtype,
            placement: Placement::default(),
        };
        let model = GptJ::load(dir.path(), &opts).expect("loads");
        let ours = last_logits(&model, ids);
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = ours
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 0.05 * scale,
            "{dtype}: max |diff| {diff} vs scale {scale}"
        );
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
        };
        assert_eq!(
            argmax(&ours),
            argmax(&reference),
            "{dtype} picks the same top token"
        );
    }
}
