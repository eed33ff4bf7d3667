//! A JSON value as a YAML document (yaml-rust2's emitter: block style, strings quoted where
//! YAML would read them as something else), with comment lines first.

use serde_json::Value;
use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlEmitter};

/// `value` as a YAML document; `comments` go first, one `# ` line each (`#` alone for an
/// empty one).
pub fn document(value: &Value, comments: &[String]) -> String {
    let mut out: String = comments
        .iter()
        .map(|c| match c.as_str() {
            "" => "#\n".to_string(),
            c => format!("# {c}\n"),
        })
        .collect();
    let mut body = String::new();
    // Writing into a String cannot fail.
    let _ = YamlEmitter::new(&mut body).dump(&yaml(value));
    out += body.trim_start_matches("---\n");
    out.push('\n');
    out
}

/// The YAML node of a JSON value.
fn yaml(v: &Value) -> Yaml {
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(float(&n.to_string())),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(yaml).collect()),
        Value::Object(map) => {
            let mut h = Hash::new();
            for (k, v) in map {
                h.insert(Yaml::String(k.clone()), yaml(v));
            }
            Yaml::Hash(h)
        }
    }
}

/// A float as YAML 1.1 readers (PyYAML, and so axolotl and torchtune) take it: with a point
/// and, after an exponent, its sign (`1e-8` would be read as a string).
fn float(json: &str) -> String {
    let (mantissa, exponent) = match json.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (json, None),
    };
    let mantissa = if mantissa.contains('.') {
        mantissa.to_string()
    } else {
        format!("{mantissa}.0")
    };
    match exponent {
        Some(e) if e.starts_with(['-', '+']) => format!("{mantissa}e{e}"),
        Some(e) => format!("{mantissa}e+{e}"),
        None => mantissa,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use yaml_rust2::YamlLoader;

    use super::*;

    #[test]
    fn values_read_back_as_written() {
        let v = json!({
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "lora_r": 16,
            "learning_rate": 0.001,
            "adam_epsilon": 1e-8,
            "bf16": false,
            "lora_target_modules": ["q_proj", "v_proj"],
            "datasets": [{"path": "data/train.jsonl", "type": "input_output"}],
            "empty": [],
            "odd": "no",
            "token": "<|im_end|>",
            "interpolated": "${output_dir}/logs",
            "none": null,
        });
        let text = document(&v, &["made by ft".into(), String::new()]);
        assert!(text.starts_with("# made by ft\n#\n"), "{text}");
        let back = &YamlLoader::load_from_str(&text).unwrap()[0];
        assert_eq!(back["lora_r"].as_i64(), Some(16));
        assert_eq!(back["adam_epsilon"].as_f64(), Some(1e-8));
        assert_eq!(back["learning_rate"].as_f64(), Some(0.001));
        assert_eq!(back["bf16"].as_bool(), Some(false));
        assert_eq!(back["odd"].as_str(), Some("no"));
        assert_eq!(back["token"].as_str(), Some("<|im_end|>"));
        assert_eq!(back["interpolated"].as_str(), Some("${output_dir}/logs"));
        assert!(back["none"].is_null());
        assert_eq!(back["datasets"][0]["type"].as_str(), Some("input_output"));
        assert_eq!(back["lora_target_modules"][1].as_str(), Some("v_proj"));
        assert!(text.contains("adam_epsilon: 1.0e-8\n"), "{text}");
    }

    #[test]
    fn floats_carry_a_point_and_a_signed_exponent() {
        assert_eq!(float("1e-8"), "1.0e-8");
        assert_eq!(float("2.5e20"), "2.5e+20");
        assert_eq!(float("0.001"), "0.001");
        assert_eq!(float("1"), "1.0");
    }
}
