//! A student made from the teacher's own layers, as DistilBERT (Sanh et al. 2019,
//! arXiv:1910.01108) initialized its student from every other layer of BERT: the embeddings,
//! final norm and head are copied, and the student keeps the chosen decoder layers in order.
//! Also the check that a teacher and a student share a tokenizer, done before any compute.

use burn::tensor::backend::Backend;
use ft_model::{LlamaConfig, LlamaForCausalLM, TextTokenizer};

/// Which teacher layers the student keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StudentInit {
    /// Layers 0, 2, 4, ... (half of them, rounded up).
    EveryOtherLayer,
    /// These layers, in increasing order.
    Layers(Vec<usize>),
}

/// A student that cannot be built or does not fit its teacher.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StudentError(pub String);

impl StudentInit {
    /// The teacher layer indices for a teacher of `n` layers.
    pub fn layers(&self, n: usize) -> Result<Vec<usize>, StudentError> {
        let layers = match self {
            Self::EveryOtherLayer => (0..n).step_by(2).collect(),
            Self::Layers(l) => l.clone(),
        };
        if layers.is_empty() {
            return Err(StudentError("student layers: the list is empty".into()));
        }
        if let Some(bad) = layers.iter().find(|&&i| i >= n) {
            return Err(StudentError(format!(
                "student layers: the teacher has layers 0..{n}, not {bad}"
            )));
        }
        if layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(StudentError(format!(
                "student layers {layers:?}: give each layer once, in increasing order"
            )));
        }
        Ok(layers)
    }
}

/// The student: the teacher's embeddings, norm and head with the chosen layers, and its
/// config (only `num_hidden_layers` differs).
pub fn student_from_teacher<B: Backend>(
    teacher: &LlamaForCausalLM<B>,
    config: &LlamaConfig,
    init: &StudentInit,
) -> Result<(LlamaForCausalLM<B>, LlamaConfig), StudentError> {
    let layers = init.layers(teacher.model.layers.len())?;
    let mut student = teacher.clone();
    student.model.layers = layers
        .iter()
        .map(|&i| teacher.model.layers[i].clone())
        .collect();
    let mut student_config = config.clone();
    student_config.num_hidden_layers = layers.len();
    Ok((student, student_config))
}

/// Fails unless teacher and student tokenize alike: the same vocabulary size in their configs
/// and tokenizers, and the same token for every id.
pub fn check_same_tokenizer(
    teacher: (&LlamaConfig, &TextTokenizer),
    student: (&LlamaConfig, &TextTokenizer),
) -> Result<(), StudentError> {
    let (tc, tt) = teacher;
    let (sc, st) = student;
    if tc.vocab_size != sc.vocab_size {
        return Err(StudentError(format!(
            "teacher and student vocabularies differ: {} vs {} rows of embeddings",
            tc.vocab_size, sc.vocab_size
        )));
    }
    if tt.vocab_size() != st.vocab_size() {
        return Err(StudentError(format!(
            "teacher and student tokenizers differ: {} vs {} tokens",
            tt.vocab_size(),
            st.vocab_size()
        )));
    }
    if let Some(id) =
        (0..tt.vocab_size() as u32).find(|&id| tt.id_to_token(id) != st.id_to_token(id))
    {
        return Err(StudentError(format!(
            "teacher and student tokenizers differ at id {id}: {:?} vs {:?}",
            tt.id_to_token(id),
            st.id_to_token(id)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData, Tolerance};
    use ft_model::tiny::tiny_config;

    use super::*;

    type B = NdArray<f32>;

    #[test]
    fn every_other_layer_and_explicit_lists() {
        assert_eq!(StudentInit::EveryOtherLayer.layers(30).unwrap().len(), 15);
        assert_eq!(
            StudentInit::EveryOtherLayer.layers(5).unwrap(),
            vec![0, 2, 4]
        );
        assert_eq!(
            StudentInit::Layers(vec![0, 3]).layers(4).unwrap(),
            vec![0, 3]
        );
        let e = StudentInit::Layers(vec![0, 4])
            .layers(4)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "student layers: the teacher has layers 0..4, not 4");
        assert!(StudentInit::Layers(vec![2, 1]).layers(4).is_err());
        assert!(StudentInit::Layers(vec![]).layers(4).is_err());
    }

    #[test]
    fn a_vocabulary_mismatch_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny_config();
        let model = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        ft_model::tiny::write_hf_folder(&model, &c, dir.path()).unwrap();
        let tok =
            TextTokenizer::from_file(&dir.path().join("tokenizer.json"), vec![258], None, None)
                .unwrap();
        assert!(check_same_tokenizer((&c, &tok), (&c, &tok)).is_ok());
        let mut bigger = c.clone();
        bigger.vocab_size += 1;
        let e = check_same_tokenizer((&c, &tok), (&bigger, &tok))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "teacher and student vocabularies differ: 259 vs 260 rows of embeddings"
        );
    }

    #[test]
    fn a_one_layer_student_computes_what_the_teacher_layer_does() {
        let mut c = tiny_config();
        c.num_hidden_layers = 3;
        let teacher = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let (student, sc) =
            student_from_teacher(&teacher, &c, &StudentInit::Layers(vec![1])).unwrap();
        assert_eq!(sc.num_hidden_layers, 1);
        // The same model by hand: the teacher with only its layer 1.
        let mut by_hand = teacher.clone();
        by_hand.model.layers = vec![teacher.model.layers[1].clone()];
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![3i64, 77, 250], [1, 3]),
            &Default::default(),
        );
        student
            .forward(ids.clone(), None)
            .into_data()
            .assert_approx_eq::<f32>(
                &by_hand.forward(ids, None).into_data(),
                Tolerance::absolute(0.0),
            );
    }
}
