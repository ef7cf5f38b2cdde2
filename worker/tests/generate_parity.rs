//! The worker generates what transformers' `generate` generates.
//!
//! transformers 4.55.4 (through `GPTJ_PYTHON`) writes random tiny GPT-J checkpoints and runs `generate` on
//! them; the worker loads the same files and must produce the same token ids, float32 on the CPU, for
//! greedy search, contrastive search (the deployment's 0.6 / 4), beam search (3 beams), with repetition
//! penalty and n-gram blocking, and with EOS and `min_new_tokens`. The rest checks what transformers has no
//! counterpart for: batches, stop sequences, and the command line.

use serde_json::{Value, json};
use shared::{FinishReason, GenerationParameters, Strategy};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use worker::decoding::{self, TextDecoder};
use worker::engine::Engine;
use worker::lm::CausalLm;
use worker::model::{GptJ, LoadOptions};

fn python() -> PathBuf {
    std::env::var_os("GPTJ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn run_python(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(python())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the Python reference runs (set GPTJ_PYTHON)");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("python finishes");
    assert!(
        out.status.success(),
        "python {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A random tiny GPT-J written by transformers (sharded safetensors), optionally with EOS made likely.
fn hf_checkpoint(seed: u64, eos_bias: Option<f64>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("base");
    let out_s = out.to_str().expect("utf-8 path");
    run_python(
        &[
            &script("make_hf_checkpoint.py"),
            out_s,
            "--format",
            "safetensors-sharded",
            "--seed",
            &seed.to_string(),
        ],
        None,
    );
    if let Some(bias) = eos_bias {
        let biased = dir.path().join("model");
        run_python(
            &[
                &script("hf_generate.py"),
                out_s,
                "--eos-bias",
                &bias.to_string(),
                "--save-to",
                biased.to_str().expect("path"),
            ],
            None,
        );
    } else {
        std::fs::rename(&out, dir.path().join("model")).expect("rename");
    }
    dir
}

/// One generation: a prompt, our parameters, and the same request as `generate` keyword arguments.
struct Case {
    prompt: Vec<i64>,
    params: GenerationParameters,
    hf_kwargs: Value,
}

fn case(prompt: &[i64], params: GenerationParameters, hf_kwargs: Value) -> Case {
    Case {
        prompt: prompt.to_vec(),
        params,
        hf_kwargs,
    }
}

fn transformers_generate(model_dir: &Path, cases: &[Case]) -> Vec<Vec<i64>> {
    let input: Vec<Value> = cases
        .iter()
        .map(|c| json!({"prompt": c.prompt, "kwargs": c.hf_kwargs}))
        .collect();
    let out = run_python(
        &[&script("hf_generate.py"), model_dir.to_str().expect("path")],
        Some(&serde_json::to_string(&input).expect("json")),
    );
    serde_json::from_str(&out).expect("results json")
}

/// Ids decode to nothing: these tests compare tokens, and stop sequences are not used.
struct NoText;
impl TextDecoder for NoText {
    fn decode(&self, _ids: &[u32]) -> String {
        String::new()
    }
}

fn ours(model: &GptJ, c: &Case) -> decoding::Decoded {
    let plan = c.params.validate().expect("valid parameters");
    let eos = model.info().eos_token_id;
    let mut out =
        decoding::generate(model, std::slice::from_ref(&c.prompt), &plan, eos, &NoText).expect("generates");
    out.results.remove(0)
}

/// Every case in one running batch, case `i` joining before step `i` (so each joins a batch already
/// decoding, and leaves it when done).
fn staggered(model: &GptJ, cases: &[Case]) -> Vec<decoding::Decoded> {
    // Unbounded limits admit every newcomer at the next step.
    let mut scheduler = decoding::Scheduler::new(model, &NoText, decoding::Limits::unbounded());
    let mut results: Vec<Option<decoding::Decoded>> = vec![None; cases.len()];
    let mut step = 0;
    let mut widest = 0;
    while step < cases.len() || scheduler.has_work() {
        if let Some(c) = cases.get(step) {
            let request = decoding::Request {
                id: step as u64,
                prompt: c.prompt.clone(),
                plan: c.params.validate().expect("valid parameters"),
                grammar: None,
                lane: shared::Lane::Interactive,
            };
            scheduler.submit(request).expect("submitted");
        }
        for event in scheduler.step() {
            if let decoding::Event::Finished { id, result } = event {
                results[id as usize] = Some(result.expect("generates").decoded);
            }
        }
        widest = widest.max(scheduler.stats().running);
        step += 1;
    }
    assert!(cases.len() < 2 || widest >= 2, "the cases shared the batch");
    results
        .into_iter()
        .map(|r| r.expect("every case finished"))
        .collect()
}

/// Each case alone, and all of them joining one running batch a step apart, give transformers' tokens.
fn assert_parity(model_dir: &Path, cases: &[Case]) -> Vec<decoding::Decoded> {
    let theirs = transformers_generate(model_dir, cases);
    let model = GptJ::load(model_dir, &LoadOptions::default()).expect("loads");
    let mut results = vec![];
    for (c, expected) in cases.iter().zip(&theirs) {
        let got = ours(&model, c);
        assert_eq!(&got.tokens, expected, "prompt {:?} with {:?}", c.prompt, c.params);
        results.push(got);
    }
    for ((c, expected), got) in cases.iter().zip(&theirs).zip(staggered(&model, cases)) {
        assert_eq!(
            &got.tokens, expected,
            "in a batch: prompt {:?} with {:?}",
            c.prompt, c.params
        );
    }
    results
}

const PROMPTS: [&[i64]; 3] = [&[15496, 995], &[464, 2068, 7586, 21831, 18045, 625, 262], &[7]];

fn params(strategy: Strategy, max_new_tokens: u32) -> GenerationParameters {
    GenerationParameters {
        strategy: Some(strategy),
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    }
}

#[test]
fn greedy_contrastive_and_beam_search_give_transformers_tokens() {
    let dir = hf_checkpoint(1, None);
    let model_dir = dir.path().join("model");
    let mut cases = vec![];
    for p in PROMPTS {
        cases.push(case(
            p,
            params(Strategy::Greedy, 20),
            json!({"max_new_tokens": 20}),
        ));
        // The deployment's default: contrastive search, penalty_alpha 0.6, top_k 4.
        cases.push(case(
            p,
            GenerationParameters {
                max_new_tokens: Some(20),
                ..Default::default()
            },
            json!({"max_new_tokens": 20, "penalty_alpha": 0.6, "top_k": 4}),
        ));
        cases.push(case(
            p,
            GenerationParameters {
                num_beams: Some(3),
                ..params(Strategy::Beam, 20)
            },
            json!({"max_new_tokens": 20, "num_beams": 3}),
        ));
    }
    cases.push(case(
        PROMPTS[1],
        GenerationParameters {
            num_beams: Some(4),
            length_penalty: Some(0.5),
            early_stopping: Some(true),
            ..params(Strategy::Beam, 12)
        },
        json!({"max_new_tokens": 12, "num_beams": 4, "length_penalty": 0.5, "early_stopping": true}),
    ));
    cases.push(case(
        PROMPTS[0],
        GenerationParameters {
            penalty_alpha: Some(0.3),
            top_k: Some(6),
            ..params(Strategy::Contrastive, 15)
        },
        json!({"max_new_tokens": 15, "penalty_alpha": 0.3, "top_k": 6}),
    ));
    let results = assert_parity(&model_dir, &cases);
    assert!(results.iter().all(|r| r.finish_reason == FinishReason::Length));
}

#[test]
fn repetition_penalty_and_ngram_blocking_give_transformers_tokens() {
    let dir = hf_checkpoint(2, None);
    let model_dir = dir.path().join("model");
    let mut cases = vec![];
    for p in PROMPTS {
        cases.push(case(
            p,
            GenerationParameters {
                repetition_penalty: Some(1.3),
                ..params(Strategy::Greedy, 20)
            },
            json!({"max_new_tokens": 20, "repetition_penalty": 1.3}),
        ));
        cases.push(case(
            p,
            GenerationParameters {
                no_repeat_ngram_size: Some(2),
                ..params(Strategy::Greedy, 20)
            },
            json!({"max_new_tokens": 20, "no_repeat_ngram_size": 2}),
        ));
    }
    cases.push(case(
        PROMPTS[1],
        GenerationParameters { repetition_penalty: Some(1.5), no_repeat_ngram_size: Some(3), ..Default::default() },
        json!({"max_new_tokens": 50, "repetition_penalty": 1.5, "no_repeat_ngram_size": 3, "penalty_alpha": 0.6, "top_k": 4}),
    ));
    cases.push(case(
        PROMPTS[0],
        GenerationParameters {
            num_beams: Some(3),
            repetition_penalty: Some(1.2),
            ..params(Strategy::Beam, 15)
        },
        json!({"max_new_tokens": 15, "num_beams": 3, "repetition_penalty": 1.2}),
    ));
    assert_parity(&model_dir, &cases);
}

#[test]
fn eos_ends_generation_and_min_new_tokens_holds_it_off_as_in_transformers() {
    // EOS's head bias raised so that the model stops within a few tokens.
    let dir = hf_checkpoint(1, Some(3.5));
    let model_dir = dir.path().join("model");
    let mut cases = vec![];
    for p in PROMPTS {
        cases.push(case(
            p,
            params(Strategy::Greedy, 12),
            json!({"max_new_tokens": 12}),
        ));
        cases.push(case(
            p,
            GenerationParameters {
                min_new_tokens: Some(4),
                ..params(Strategy::Greedy, 12)
            },
            json!({"max_new_tokens": 12, "min_new_tokens": 4}),
        ));
        cases.push(case(
            p,
            GenerationParameters {
                max_new_tokens: Some(12),
                ..Default::default()
            },
            json!({"max_new_tokens": 12, "penalty_alpha": 0.6, "top_k": 4}),
        ));
        cases.push(case(
            p,
            GenerationParameters {
                num_beams: Some(3),
                ..params(Strategy::Beam, 12)
            },
            json!({"max_new_tokens": 12, "num_beams": 3}),
        ));
        cases.push(case(
            p,
            GenerationParameters {
                num_beams: Some(3),
                min_new_tokens: Some(3),
                ..params(Strategy::Beam, 12)
            },
            json!({"max_new_tokens": 12, "num_beams": 3, "min_new_tokens": 3}),
        ));
    }
    let results = assert_parity(&model_dir, &cases);
    let eos = 50256;
    for r in &results {
        let ended_with_eos = r.tokens.last() == Some(&eos);
        assert_eq!(r.finish_reason == FinishReason::Eos, ended_with_eos, "{r:?}");
        assert!(ended_with_eos || r.tokens.len() == 12, "{r:?}");
    }
    assert!(
        results
            .iter()
            .filter(|r| r.finish_reason == FinishReason::Eos)
            .count()
            >= 5,
        "EOS is exercised"
    );
    // min_new_tokens: no EOS among the first 4 (greedy) / 3 (beam) tokens.
    for (i, r) in results.iter().enumerate() {
        let min = match i % 5 {
            1 => 4,
            4 => 3,
            _ => 0,
        };
        assert!(
            !r.tokens[..min.min(r.tokens.len())].contains(&eos),
            "case {i}: {r:?}"
        );
        assert!(r.tokens.len() > min, "case {i}: {r:?}");
    }
}

#[test]
fn ignore_eos_generates_through_eos_as_transformers_does_without_one() {
    // EOS's head bias raised so that the model would stop within a few tokens; ignoring it, every strategy
    // runs to max_new_tokens, EOS tokens included, as transformers does with no EOS token to stop at.
    let dir = hf_checkpoint(1, Some(3.5));
    let model_dir = dir.path().join("model");
    let ignoring = |p: GenerationParameters| GenerationParameters {
        ignore_eos: Some(true),
        ..p
    };
    let mut cases = vec![];
    for p in PROMPTS {
        cases.push(case(
            p,
            ignoring(params(Strategy::Greedy, 12)),
            json!({"max_new_tokens": 12, "eos_token_id": null}),
        ));
        cases.push(case(
            p,
            ignoring(GenerationParameters {
                max_new_tokens: Some(12),
                ..Default::default()
            }),
            json!({"max_new_tokens": 12, "penalty_alpha": 0.6, "top_k": 4, "eos_token_id": null}),
        ));
        cases.push(case(
            p,
            ignoring(GenerationParameters {
                num_beams: Some(3),
                ..params(Strategy::Beam, 12)
            }),
            json!({"max_new_tokens": 12, "num_beams": 3, "eos_token_id": null}),
        ));
    }
    let results = assert_parity(&model_dir, &cases);
    for r in &results {
        assert_eq!(r.tokens.len(), 12, "{r:?}");
        assert_eq!(r.finish_reason, FinishReason::Length, "{r:?}");
    }
    assert!(
        results.iter().filter(|r| r.tokens.contains(&50256)).count() >= 3,
        "EOS is generated and passed: {results:?}"
    );
}

/// A tiny model written by the worker itself, with its tokenizer.
fn tiny_engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("temp dir");
    worker::tiny::write_tiny_model(dir.path(), &worker::tiny::TinyConfig::tiny(), 3).expect("writes");
    let engine = Engine::load(&worker::engine::EngineOptions {
        model_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .expect("loads");
    (dir, engine)
}

#[test]
fn a_batch_of_different_lengths_gives_each_prompt_what_it_gets_alone() {
    let (_dir, engine) = tiny_engine();
    let prompts = [
        "Hi",
        "The quick brown fox jumps over the lazy dog because",
        "Once upon a time, there",
    ];
    let strategies = [
        params(Strategy::Greedy, 16),
        GenerationParameters {
            max_new_tokens: Some(16),
            ..Default::default()
        },
        GenerationParameters {
            seed: Some(11),
            top_p: Some(0.9),
            ..params(Strategy::Sample, 16)
        },
        GenerationParameters {
            num_beams: Some(3),
            ..params(Strategy::Beam, 16)
        },
        GenerationParameters {
            repetition_penalty: Some(1.4),
            min_new_tokens: Some(16),
            ..params(Strategy::Greedy, 16)
        },
        GenerationParameters {
            no_repeat_ngram_size: Some(2),
            ..Default::default()
        },
    ];
    for params in strategies {
        let plan = params.validate().expect("valid");
        let batch = engine.generate_batch(&prompts, &plan).expect("batch").generations;
        for (prompt, got) in prompts.iter().zip(&batch) {
            let alone = engine.generate(prompt, &plan).expect("alone");
            assert_eq!(got.token_ids, alone.token_ids, "{prompt:?} with {params:?}");
            assert_eq!(got.text, alone.text);
            assert_eq!(got.finish_reason, alone.finish_reason);
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (_dir, engine) = tiny_engine();
    let plan = |seed| {
        GenerationParameters {
            seed: Some(seed),
            ..params(Strategy::Sample, 24)
        }
        .validate()
        .expect("valid")
    };
    let a = engine.generate("Seeds make", &plan(5)).expect("a");
    let b = engine.generate("Seeds make", &plan(5)).expect("b");
    let c = engine.generate("Seeds make", &plan(6)).expect("c");
    assert_eq!(a.token_ids, b.token_ids);
    assert_ne!(a.token_ids, c.token_ids);
}

#[test]
fn a_stop_sequence_ends_the_text_before_it() {
    let (_dir, engine) = tiny_engine();
    let free = engine
        .generate(
            "Tell me a story",
            &params(Strategy::Greedy, 40).validate().expect("valid"),
        )
        .expect("runs");
    assert_eq!(free.finish_reason, FinishReason::Length);
    // A stop string taken from the middle of the free-running text.
    let chars: Vec<char> = free.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let at = free.text.find(&stop).expect("the stop string occurs");
    let plan = GenerationParameters {
        stop: vec![stop.clone()],
        ..params(Strategy::Greedy, 40)
    }
    .validate()
    .expect("valid");
    let stopped = engine.generate("Tell me a story", &plan).expect("runs");
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.text, free.text[..at], "stop {stop:?}");
    assert!(stopped.token_ids.len() < free.token_ids.len());
    assert_eq!(stopped.token_ids[..], free.token_ids[..stopped.token_ids.len()]);
    // min_new_tokens keeps a stop sequence from ending the text early.
    let plan = GenerationParameters {
        stop: vec![stop.clone()],
        min_new_tokens: Some(40),
        ..params(Strategy::Greedy, 40)
    }
    .validate()
    .expect("valid");
    let held = engine.generate("Tell me a story", &plan).expect("runs");
    assert_eq!(held.finish_reason, FinishReason::Length);
    assert_eq!(held.token_ids, free.token_ids);
}

#[test]
fn a_prompt_too_long_for_the_context_is_a_clear_error() {
    let (_dir, engine) = tiny_engine();
    let n_positions = engine.model().info().n_positions;
    let long = "hello ".repeat(n_positions);
    let err = engine
        .generate(&long, &params(Strategy::Greedy, 10).validate().expect("valid"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            worker::engine::EngineError::ContextOverflow {
                max_new_tokens: 10,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("context"), "{err}");
}

fn worker_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_worker"))
}

#[test]
fn the_command_line_prints_one_json_object() {
    let dir = tempfile::tempdir().expect("temp dir");
    worker::tiny::write_tiny_model(dir.path(), &worker::tiny::TinyConfig::tiny(), 0).expect("writes");
    let out = worker_bin()
        .args([
            "generate",
            "--model",
            dir.path().to_str().expect("path"),
            "--prompt",
            "Hello there",
        ])
        .args([
            "--strategy",
            "greedy",
            "--max-new-tokens",
            "7",
            "--threads",
            "1",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert!(v["text"].is_string());
    let ids = v["token_ids"].as_array().expect("token_ids");
    assert!(!ids.is_empty() && ids.len() <= 7);
    assert!(["length", "eos", "stop"].contains(&v["finish_reason"].as_str().expect("finish_reason")));
    let t = &v["timings"];
    for field in ["load_ms", "prefill_ms", "decode_ms"] {
        assert!(t[field].is_u64(), "timings.{field}: {t}");
    }
    assert_eq!(t["new_tokens"].as_u64(), Some(ids.len() as u64));
    // The same request through the engine gives the same tokens.
    let engine = Engine::load(&worker::engine::EngineOptions {
        model_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .expect("loads");
    let g = engine
        .generate(
            "Hello there",
            &params(Strategy::Greedy, 7).validate().expect("valid"),
        )
        .expect("runs");
    let ids: Vec<u32> = ids.iter().map(|i| i.as_u64().expect("id") as u32).collect();
    assert_eq!(ids, g.token_ids);
    assert_eq!(v["text"].as_str(), Some(g.text.as_str()));
}

#[test]
fn out_of_range_parameters_fail_naming_the_parameter() {
    // Validation runs before the model loads, so no model is needed.
    let cases: [(&[&str], &str); 5] = [
        (&["--strategy", "sample", "--temperature", "0"], "temperature"),
        (&["--strategy", "sample", "--top-p", "1.5"], "top_p"),
        (&["--max-new-tokens", "0"], "max_new_tokens"),
        (&["--penalty-alpha", "2"], "penalty_alpha"),
        (&["--strategy", "greedy", "--num-beams", "3"], "num_beams"),
    ];
    for (args, field) in cases {
        let out = worker_bin()
            .args(["generate", "--model", "/nonexistent", "--prompt", "x"])
            .args(args)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
}
