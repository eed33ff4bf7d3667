//! Metric sinks of a run: one JSON object per line (`metrics.jsonl`) and TensorBoard event
//! files, which TensorBoard reads directly.
//!
//! An event file is a TFRecord stream (u64 length, masked CRC-32C of the length, the bytes,
//! masked CRC-32C of the bytes) of `tensorflow.Event` protobufs: the first carries
//! `file_version = "brain.Event:2"`, each later one a wall time, a step and a `Summary` of
//! scalar values (`tag`, `simple_value`). The few protobuf fields are encoded by hand here.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value};

/// The tag of each step's wall time in seconds (forward, backward, clipping and update).
pub const STEP_SECONDS: &str = "train/step_s";

/// The [`STEP_SECONDS`] scalar of a step that began at `start`, taken now.
pub fn step_seconds(start: Instant) -> (&'static str, f64) {
    (STEP_SECONDS, start.elapsed().as_secs_f64())
}

/// Writes metrics to the sinks a recipe names.
pub struct Metrics {
    jsonl: Option<File>,
    tensorboard: Option<EventWriter>,
    /// Every [`STEP_SECONDS`] logged by this process, for the summary's median: a median
    /// leaves out the first steps' allocations and the steps that share a moment with an
    /// evaluation or a checkpoint elsewhere on the machine.
    step_seconds: Vec<f64>,
}

impl Metrics {
    /// Opens the sinks in `dir`; when resuming, `metrics.jsonl` keeps only the lines up to
    /// `resume_step`, so that it reads as one uninterrupted run.
    pub fn open(
        dir: &Path,
        loggers: &[String],
        resume_step: Option<usize>,
    ) -> std::io::Result<Self> {
        let jsonl = if loggers.iter().any(|l| l == "jsonl") {
            let path = dir.join("metrics.jsonl");
            let kept: Vec<String> = match (resume_step, File::open(&path)) {
                (Some(step), Ok(f)) => BufReader::new(f)
                    .lines()
                    .map_while(Result::ok)
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let mut f = File::create(&path)?;
            for l in kept {
                writeln!(f, "{l}")?;
            }
            Some(f)
        } else {
            None
        };
        let tensorboard = if loggers.iter().any(|l| l == "tensorboard") {
            Some(EventWriter::create(dir)?)
        } else {
            None
        };
        Ok(Self {
            jsonl,
            tensorboard,
            step_seconds: Vec::new(),
        })
    }

    /// The median of the step times logged so far (`None` before the first).
    pub fn median_step_seconds(&self) -> Option<f64> {
        median(&self.step_seconds)
    }

    /// Records the scalars of `step` in every sink.
    pub fn log(&mut self, step: usize, scalars: &[(&str, f64)]) -> std::io::Result<()> {
        self.step_seconds.extend(
            scalars
                .iter()
                .filter(|(k, _)| *k == STEP_SECONDS)
                .map(|(_, v)| *v),
        );
        if let Some(f) = &mut self.jsonl {
            let mut obj = Map::new();
            obj.insert("step".into(), Value::from(step));
            for (k, v) in scalars {
                obj.insert((*k).into(), Value::from(*v));
            }
            writeln!(f, "{}", Value::Object(obj))?;
            f.flush()?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(step, scalars)?;
        }
        Ok(())
    }
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some(0.5 * (v[n / 2 - 1] + v[n / 2])),
    }
}

/// A TensorBoard event file.
pub struct EventWriter {
    file: File,
    /// Where it is.
    pub path: PathBuf,
}

impl EventWriter {
    /// Creates `events.out.tfevents.{time}.ft` in `dir` and writes the version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.ft",
            now.as_secs(),
            now.subsec_nanos()
        ));
        let mut w = Self {
            file: File::create(&path)?,
            path,
        };
        let mut event = Vec::new();
        field_f64(&mut event, 1, now.as_secs_f64());
        field_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    /// One event with a scalar summary per value.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            field_bytes(&mut value, 1, tag.as_bytes());
            value.push((2 << 3) | 5); // simple_value: float, fixed32
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        field_f64(&mut event, 1, now.as_secs_f64());
        event.push(2 << 3); // step: int64, varint
        varint(&mut event, step as u64);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())?;
        self.file.flush()
    }
}

/// TFRecord's CRC mask.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push((field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn field_f64(out: &mut Vec<u8>, field: u8, v: f64) {
    out.push((field << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

/// Reads the scalar values of an event file back: `(step, tag, value)`.
pub fn read_events(path: &Path) -> std::io::Result<Vec<(u64, String, f32)>> {
    let bytes = std::fs::read(path)?;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not a TFRecord file", path.display()),
        )
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = bytes.get(at..at + 8).ok_or_else(bad)?;
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| bad())?) as usize;
        let crc = u32::from_le_bytes(
            bytes
                .get(at + 8..at + 12)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        if crc != masked_crc(len_bytes) {
            return Err(bad());
        }
        let data = bytes.get(at + 12..at + 12 + len).ok_or_else(bad)?;
        let crc = u32::from_le_bytes(
            bytes
                .get(at + 12 + len..at + 16 + len)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        );
        if crc != masked_crc(data) {
            return Err(bad());
        }
        out.extend(parse_event(data));
        at += 16 + len;
    }
    Ok(out)
}

/// Protobuf fields of a message: `(field, wire payload)`.
fn fields(mut data: &[u8]) -> Vec<(u8, &[u8], u64)> {
    let mut out = Vec::new();
    let read_varint = |d: &mut &[u8]| {
        let (mut v, mut shift) = (0u64, 0);
        while let Some((&b, rest)) = d.split_first() {
            *d = rest;
            v |= ((b & 0x7f) as u64) << shift;
            shift += 7;
            if b < 0x80 {
                break;
            }
        }
        v
    };
    while !data.is_empty() {
        let key = read_varint(&mut data);
        let (field, wire) = ((key >> 3) as u8, key & 7);
        match wire {
            0 => {
                let v = read_varint(&mut data);
                out.push((field, &data[..0], v));
            }
            1 if data.len() >= 8 => {
                out.push((field, &data[..8], 0));
                data = &data[8..];
            }
            2 => {
                let n = (read_varint(&mut data) as usize).min(data.len());
                out.push((field, &data[..n], 0));
                data = &data[n..];
            }
            5 if data.len() >= 4 => {
                out.push((field, &data[..4], 0));
                data = &data[4..];
            }
            _ => break,
        }
    }
    out
}

fn parse_event(data: &[u8]) -> Vec<(u64, String, f32)> {
    let f = fields(data);
    let step = f.iter().find(|x| x.0 == 2).map_or(0, |x| x.2);
    let mut out = Vec::new();
    for (_, summary, _) in f.iter().filter(|x| x.0 == 5) {
        for (_, value, _) in fields(summary).into_iter().filter(|x| x.0 == 1) {
            let vf = fields(value);
            let tag = vf
                .iter()
                .find(|x| x.0 == 1)
                .map(|x| String::from_utf8_lossy(x.1).into_owned());
            let v = vf
                .iter()
                .find(|x| x.0 == 2)
                .and_then(|x| x.1.try_into().ok())
                .map(f32::from_le_bytes);
            if let (Some(tag), Some(v)) = (tag, v) {
                out.push((step, tag, v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // crc32c("") = 0; masked: rotr(0, 15) + 0xa282ead8.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        // crc32c("123456789") = 0xe3069283 (the CRC-32C check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn the_median_step_time_is_that_of_the_logged_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Metrics::open(dir.path(), &[], None).unwrap();
        assert_eq!(m.median_step_seconds(), None);
        for (step, s) in [(1, 9.0), (2, 1.0), (3, 2.0)] {
            m.log(step, &[("train/loss", 3.0), (STEP_SECONDS, s)])
                .unwrap();
        }
        assert_eq!(m.median_step_seconds(), Some(2.0));
        m.log(4, &[(STEP_SECONDS, 4.0)]).unwrap();
        assert_eq!(m.median_step_seconds(), Some(3.0));
    }

    #[test]
    fn event_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("train/loss", 1.5), ("train/lr", 0.001)])
            .unwrap();
        let events = read_events(&w.path).unwrap();
        assert_eq!(
            events,
            vec![(3, "train/loss".into(), 1.5), (3, "train/lr".into(), 0.001)]
        );
    }
}
