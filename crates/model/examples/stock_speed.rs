//! Times candle-transformers' stock quantized llama on a GGUF file (prefill
//! of N tokens, then decode), to compare with `kvserve bench`.
//!
//! `cargo run --release -p model --example stock_speed -- FILE [PROMPT_TOKENS]`
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: stock_speed FILE [PROMPT_TOKENS]");
    let n: usize = args.next().map_or(128, |s| s.parse().unwrap());
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut m =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..n as u32).map(|i| 1000 + i * 7 % 3000).collect();
    let t = Instant::now();
    let x = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut logits = m.forward(&x, 0).unwrap();
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let steps = 32;
    for i in 0..steps {
        let next = logits.squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let x = Tensor::new(&[next], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        logits = m.forward(&x, n + i).unwrap();
    }
    let decode = t.elapsed().as_secs_f64();
    println!(
        "stock candle: prefill {n} tokens {:.1} tok/s, decode {:.1} tok/s",
        n as f64 / prefill,
        steps as f64 / decode
    );
}
