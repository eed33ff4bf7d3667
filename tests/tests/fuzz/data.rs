//! Training data files: JSONL, Parquet (the `parquet` crate's reader behind ft's rows) and
//! CSV, read into records with a column mapping as `ft train` reads `data.train`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use ft_tests::fuzz::{budget, fuzz, mutate_bytes, Outcome, Rng, Target};
use ft_trainer::data::{self, Format};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use crate::{LONG, QUICK};

/// A valid Parquet file of `rows` examples in columns `question` and `answer`.
fn parquet_seed(dir: &Path, rows: usize, compressed: bool) -> Vec<u8> {
    let path = dir.join(format!("seed-{rows}-{compressed}.parquet"));
    let schema = parse_message_type(
        "message rows { REQUIRED BYTE_ARRAY question (UTF8); OPTIONAL BYTE_ARRAY answer (UTF8); }",
    )
    .expect("the schema");
    let mut props = WriterProperties::builder();
    if compressed {
        props = props.set_compression(parquet::basic::Compression::SNAPPY);
    }
    let file = File::create(&path).expect("the seed file");
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props.build()))
        .expect("a writer");
    let mut group = writer.next_row_group().expect("a row group");
    let questions: Vec<ByteArray> = (0..rows)
        .map(|i| ByteArray::from(format!("{i} plus one is").as_str()))
        .collect();
    let answers: Vec<ByteArray> = (0..rows)
        .map(|i| ByteArray::from(format!(" {}", i + 1).as_str()))
        .collect();
    let mut column = group.next_column().expect("a column").expect("question");
    column
        .typed::<ByteArrayType>()
        .write_batch(&questions, None, None)
        .expect("the questions");
    column.close().expect("closed");
    let mut column = group.next_column().expect("a column").expect("answer");
    let defined = vec![1i16; rows];
    column
        .typed::<ByteArrayType>()
        .write_batch(&answers, Some(&defined), None)
        .expect("the answers");
    column.close().expect("closed");
    group.close().expect("the row group");
    writer.close().expect("the file");
    std::fs::read(&path).expect("the seed")
}

/// Reads `input`, written as `file`, as completions with the columns mapped.
fn run(file: &Path, input: &[u8]) -> Outcome {
    std::fs::write(file, input).expect("write the input");
    let columns: BTreeMap<String, String> = [("prompt", "question"), ("completion", "answer")]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
    match data::read(file, Format::Completion, &columns) {
        Ok(_) => Outcome::Accepted,
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn fuzz_file(name: &str, extension: &str, seeds: Vec<Vec<u8>>, default: u64) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = dir.path().join(format!("input.{extension}"));
    let (inputs, seed) = budget(default);
    let report = fuzz(
        &Target {
            name,
            seeds,
            mutate: &|rng: &mut Rng, seed: &[u8]| {
                let mut v = seed.to_vec();
                // Parquet's metadata sits at the end, before its length and magic.
                let tail = v.len().saturating_sub(256)..v.len();
                let focus = if rng.chance(0.5) { tail } else { 0..v.len() };
                mutate_bytes(rng, &mut v, focus);
                v
            },
            run: &|input| run(&file, input),
            // The file, its rows as JSON and their records.
            heap_bound: &|n| 64 * n + (16 << 20),
        },
        inputs,
        seed,
    );
    report.assert_clean();
}

#[test]
fn parquet_files_never_panic() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let seeds = vec![
        parquet_seed(dir.path(), 3, false),
        parquet_seed(dir.path(), 40, true),
    ];
    fuzz_file("parquet", "parquet", seeds, QUICK);
}

fn csv_seeds() -> Vec<Vec<u8>> {
    vec![
        b"question,answer\n1 plus one is, 2\n\"a, b\",\"c\"\"d\"\n".to_vec(),
        b"answer,question,id\n 3,2 plus one is,7\n".to_vec(),
    ]
}

fn jsonl_seeds() -> Vec<Vec<u8>> {
    vec![
        b"{\"question\": \"1 plus one is\", \"answer\": \" 2\"}\n{\"question\": \"a\\nb\", \"answer\": \"\\u00e9\", \"id\": [1, {}]}\n".to_vec(),
        b"\n{\"answer\": \" 3\", \"question\": \"2 plus one is\"}".to_vec(),
    ]
}

#[test]
fn csv_files_never_panic() {
    fuzz_file("csv", "csv", csv_seeds(), QUICK);
}

#[test]
fn jsonl_files_never_panic() {
    fuzz_file("jsonl", "jsonl", jsonl_seeds(), QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn parquet_files_never_panic_long() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let seeds = vec![
        parquet_seed(dir.path(), 3, false),
        parquet_seed(dir.path(), 40, true),
    ];
    fuzz_file("parquet", "parquet", seeds, LONG);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn csv_files_never_panic_long() {
    fuzz_file("csv", "csv", csv_seeds(), LONG);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn jsonl_files_never_panic_long() {
    fuzz_file("jsonl", "jsonl", jsonl_seeds(), LONG);
}
