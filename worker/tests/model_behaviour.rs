//! How the model behaves beyond single-prompt parity: the KV cache, left-padded batches, placement maps
//! over CPU parts, and the tiny-model writer.

use tch::{Device, Kind, Tensor};
use worker::device_map::Placement;
use worker::lm::{CausalLm, KvCache, Logits};
use worker::model::{GptJ, LoadOptions};
use worker::tiny::{TinyConfig, write_tiny_model};

fn tiny_model(seed: u64) -> (tempfile::TempDir, GptJ) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_model(dir.path(), &TinyConfig::tiny(), seed).expect("writes");
    let model = GptJ::load(dir.path(), &LoadOptions::default()).expect("loads");
    (dir, model)
}

fn ids(v: &[i64]) -> Tensor {
    Tensor::from_slice(v).view([1, v.len() as i64])
}

/// Logits of every position of `prompt` run alone, in one pass.
fn solo(model: &GptJ, prompt: &[i64]) -> Tensor {
    let n = prompt.len() as i64;
    let mut cache = KvCache::new(model.info().n_layer);
    let mask = Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
    let pos = Tensor::arange(n, (Kind::Int64, Device::Cpu)).view([1, n]);
    model
        .forward(&ids(prompt), &mask, &pos, &mut cache, Logits::All, false)
        .expect("forward")
        .logits
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn decoding_token_by_token_through_the_cache_gives_the_full_pass_logits() {
    let (_dir, model) = tiny_model(11);
    let prompt: Vec<i64> = vec![464, 2068, 7586, 21831, 18045, 625, 262];
    let full = solo(&model, &prompt);
    // Prefill three tokens, then one at a time.
    let mut cache = KvCache::new(model.info().n_layer);
    let mut last = None;
    let mut fed = 0;
    for chunk in [
        &prompt[..3],
        &prompt[3..4],
        &prompt[4..5],
        &prompt[5..6],
        &prompt[6..],
    ] {
        let n = chunk.len() as i64;
        let total = fed + n;
        let mask = Tensor::ones([1, total], (Kind::Int64, Device::Cpu));
        let pos = Tensor::arange_start(fed, total, (Kind::Int64, Device::Cpu)).view([1, n]);
        let out = model
            .forward(&ids(chunk), &mask, &pos, &mut cache, Logits::LastOnly, true)
            .expect("step");
        assert_eq!(out.logits.size(), [1, 1, 50400]);
        assert_eq!(out.hidden.as_ref().map(|h| h.size()), Some(vec![1, n, 64]));
        fed = total;
        assert_eq!(cache.seq_len() as i64, fed);
        let expected = full.narrow(1, total - 1, 1);
        assert!(max_diff(&out.logits, &expected) < 1e-4, "after {fed} tokens");
        last = Some(out.logits);
    }
    assert!(last.is_some());
}

#[test]
fn a_left_padded_batch_gives_each_row_the_logits_it_gets_alone() {
    let (_dir, model) = tiny_model(5);
    let prompts: Vec<Vec<i64>> = vec![vec![15496, 995, 318, 257, 1332], vec![7], vec![50256, 40, 1842]];
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let b = prompts.len() as i64;
    let (mut input, mut mask) = (Vec::new(), Vec::new());
    for p in &prompts {
        let pad = width as usize - p.len();
        input.extend(std::iter::repeat_n(50256, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
    }
    let input = Tensor::from_slice(&input).view([b, width]);
    let mut mask = Tensor::from_slice(&mask).view([b, width]);
    // Positions as transformers' generate derives them: cumulative sum of the mask, padding at 1.
    let pos = (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let mut cache = KvCache::new(model.info().n_layer);
    let out = model
        .forward(&input, &mask, &pos, &mut cache, Logits::LastOnly, false)
        .expect("batch");
    let next: Vec<i64> = vec![11, 13, 30];
    for (row, p) in prompts.iter().enumerate() {
        let alone = solo(&model, p);
        let diff = max_diff(
            &out.logits.get(row as i64).view([1, 1, -1]),
            &alone.narrow(1, p.len() as i64 - 1, 1),
        );
        assert!(diff < 1e-4, "row {row} differs by {diff}");
    }
    // One decode step after the padded prefill: the cache keeps the rows apart too.
    mask = Tensor::cat(&[mask, Tensor::ones([b, 1], (Kind::Int64, Device::Cpu))], 1);
    let step_pos = pos.narrow(1, width - 1, 1) + 1;
    let step = Tensor::from_slice(&next).view([b, 1]);
    let out = model
        .forward(&step, &mask, &step_pos, &mut cache, Logits::LastOnly, false)
        .expect("step");
    for (row, p) in prompts.iter().enumerate() {
        let mut longer = p.clone();
        longer.push(next[row]);
        let alone = solo(&model, &longer);
        let diff = max_diff(
            &out.logits.get(row as i64).view([1, 1, -1]),
            &alone.narrow(1, p.len() as i64, 1),
        );
        assert!(diff < 1e-4, "row {row} after one step differs by {diff}");
    }
}

#[test]
fn layers_spread_over_cpu_parts_give_identical_logits() {
    let (dir, model) = tiny_model(2);
    let prompt = [818, 262, 3726, 373, 262, 1573];
    let reference = solo(&model, &prompt);
    for placement in [
        Placement::parse_device_map("cpu=embed,0,cpu=1-2+norm,cpu=head").expect("parses"),
        Placement::parse_max_memory("cpu=8GiB").expect("parses"),
    ] {
        let opts = LoadOptions {
            placement: placement.clone(),
            ..LoadOptions::default()
        };
        let spread = GptJ::load(dir.path(), &opts).expect("loads");
        assert!(spread.device_map().devices() == vec![Device::Cpu]);
        assert!(
            solo(&spread, &prompt).equal(&reference),
            "{placement:?} changes the logits"
        );
    }
}

#[test]
fn wrong_inputs_are_errors_not_panics() {
    let (_dir, model) = tiny_model(1);
    let mut cache = KvCache::new(model.info().n_layer);
    let input = ids(&[1, 2, 3]);
    let pos = Tensor::arange(3, (Kind::Int64, Device::Cpu)).view([1, 3]);
    let short_mask = Tensor::ones([1, 2], (Kind::Int64, Device::Cpu));
    let err = model
        .forward(&input, &short_mask, &pos, &mut cache, Logits::All, false)
        .expect_err("mask too short");
    assert!(err.to_string().contains("attention_mask"), "{err}");
    let mut wrong_cache = KvCache::new(1);
    let mask = Tensor::ones([1, 3], (Kind::Int64, Device::Cpu));
    assert!(
        model
            .forward(&input, &mask, &pos, &mut wrong_cache, Logits::All, false)
            .is_err()
    );
    let long: Vec<i64> = vec![1; 2049];
    let n = long.len() as i64;
    let err = model
        .forward(
            &ids(&long),
            &Tensor::ones([1, n], (Kind::Int64, Device::Cpu)),
            &Tensor::arange(n, (Kind::Int64, Device::Cpu)).view([1, n]),
            &mut cache,
            Logits::LastOnly,
            false,
        )
        .expect_err("longer than n_positions");
    assert!(err.to_string().contains("n_positions"), "{err}");
}

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .map(|p| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_tiny_model_is_deterministic_for_a_seed_and_sharded() {
    let (a, b, c) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    write_tiny_model(a.path(), &TinyConfig::tiny(), 42).expect("writes");
    write_tiny_model(b.path(), &TinyConfig::tiny(), 42).expect("writes");
    write_tiny_model(c.path(), &TinyConfig::tiny(), 43).expect("writes");
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    assert!(fa == fb, "same seed, same bytes");
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    assert!(
        fa.iter()
            .zip(&fc)
            .any(|(x, y)| x.0.ends_with(".safetensors") && x.1 != y.1),
        "another seed, other weights"
    );
}

#[test]
fn tiny_models_in_half_precision_are_stored_as_such() {
    let dir = tempfile::tempdir().expect("dir");
    let cfg = TinyConfig {
        dtype: worker::model::Dtype::BFloat16,
        ..TinyConfig::tiny()
    };
    write_tiny_model(dir.path(), &cfg, 0).expect("writes");
    let index = std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).expect("index");
    assert!(index.contains("total_size"));
    let shard = std::fs::read(dir.path().join("model-00001-of-00002.safetensors")).expect("shard");
    assert!(String::from_utf8_lossy(&shard[..2000.min(shard.len())]).contains("\"BF16\""));
    let model = GptJ::load(dir.path(), &LoadOptions::default()).expect("bf16 checkpoint loads as float32");
    assert_eq!(solo(&model, &[1, 2]).kind(), Kind::Float);
}
