//! The classifier: multinomial logistic regression (`hidden = 0`) or a one-hidden-layer
//! tanh MLP, trained by plain mini-batch SGD on softmax cross-entropy.
//!
//! Determinism: one thread, every sum taken in a fixed order, no fused multiply-add,
//! `exp`/`tanh` from [`crate::math`], and batches from [`crate::rng`]. The whole training
//! state is therefore `(step, params)`: plain SGD has no momentum to save.

use crate::data::Dataset;
use crate::math;
use crate::rng::{self, Stream};

/// The sizes that fix the parameter layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub features: usize,
    /// 0 = no hidden layer.
    pub hidden: usize,
    pub classes: usize,
}

impl std::fmt::Display for Shape {
    /// Layer widths, e.g. `4-16-3` (or `4-3` without a hidden layer).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.hidden == 0 {
            write!(f, "{}-{}", self.features, self.classes)
        } else {
            write!(f, "{}-{}-{}", self.features, self.hidden, self.classes)
        }
    }
}

impl Shape {
    /// `(inputs, outputs)` of each dense layer, input to output.
    fn layers(&self) -> Vec<(usize, usize)> {
        if self.hidden == 0 {
            vec![(self.features, self.classes)]
        } else {
            vec![(self.features, self.hidden), (self.hidden, self.classes)]
        }
    }

    /// Number of f64 parameters: per layer, the weights (row-major, `outputs x inputs`)
    /// then the biases. This is also the order of `model.txt`.
    pub fn param_count(&self) -> usize {
        self.layers().iter().map(|&(i, o)| o * i + o).sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub shape: Shape,
    pub params: Vec<f64>,
}

/// A dense layer's view into the flat parameter vector.
struct Layer<'a> {
    inputs: usize,
    outputs: usize,
    /// `outputs x inputs` weights followed by `outputs` biases.
    params: &'a [f64],
}

impl Layer<'_> {
    fn weight(&self, o: usize, i: usize) -> f64 {
        self.params[o * self.inputs + i]
    }

    fn bias(&self, o: usize) -> f64 {
        self.params[self.outputs * self.inputs + o]
    }

    /// `W a + b`, each output summed over inputs in index order.
    fn apply(&self, a: &[f64]) -> Vec<f64> {
        (0..self.outputs)
            .map(|o| {
                let mut z = self.bias(o);
                for (i, &ai) in a.iter().enumerate() {
                    z += self.weight(o, i) * ai;
                }
                z
            })
            .collect()
    }
}

impl Model {
    /// Xavier-uniform weights drawn from `seed`, zero biases.
    pub fn init(shape: Shape, seed: u64) -> Model {
        let mut params = Vec::with_capacity(shape.param_count());
        for (inputs, outputs) in shape.layers() {
            let limit = (6.0 / (inputs + outputs) as f64).sqrt();
            for _ in 0..inputs * outputs {
                let r = rng::draw(seed, Stream::Init, params.len() as u64, 0);
                params.push((2.0 * rng::unit(r) - 1.0) * limit);
            }
            params.resize(params.len() + outputs, 0.0);
        }
        Model { shape, params }
    }

    fn layers(&self) -> Vec<Layer<'_>> {
        let mut rest = self.params.as_slice();
        let mut out = Vec::new();
        for (inputs, outputs) in self.shape.layers() {
            let (params, tail) = rest.split_at(outputs * inputs + outputs);
            out.push(Layer {
                inputs,
                outputs,
                params,
            });
            rest = tail;
        }
        out
    }

    /// The activations of every layer for input `x`: `[x, hidden.., logits]`.
    fn forward(&self, x: &[f64]) -> Vec<Vec<f64>> {
        let layers = self.layers();
        let mut acts = vec![x.to_vec()];
        for (l, layer) in layers.iter().enumerate() {
            let mut z = layer.apply(&acts[l]);
            if l + 1 < layers.len() {
                z.iter_mut().for_each(|v| *v = math::tanh(*v));
            }
            acts.push(z);
        }
        acts
    }

    /// Class probabilities for input `x`.
    pub fn predict(&self, x: &[f64]) -> Vec<f64> {
        let acts = self.forward(x);
        softmax(acts.last().map_or(&[][..], Vec::as_slice))
    }

    /// One SGD step on the mini-batch that `(seed, step)` selects.
    pub fn sgd_step(&mut self, data: &Dataset, seed: u64, step: u64, batch: usize, lr: f64) {
        let grad = self.gradient_share(data, seed, step, batch, 0, 1);
        self.apply(&grad, lr, batch);
    }

    /// The summed gradient of the examples `j` of step `step`'s batch with
    /// `j % ranks == rank`: one rank's share in data-parallel training (all of it
    /// for one rank). The batch is the same whatever the number of ranks.
    pub fn gradient_share(
        &self,
        data: &Dataset,
        seed: u64,
        step: u64,
        batch: usize,
        rank: usize,
        ranks: usize,
    ) -> Vec<f64> {
        let mut grad = vec![0.0; self.params.len()];
        for j in (rank..batch).step_by(ranks.max(1)) {
            let row = rng::below(rng::draw(seed, Stream::Batch, step, j as u64), data.rows);
            self.accumulate_gradient(data.row(row), data.labels[row], &mut grad);
        }
        grad
    }

    /// One SGD update with the batch's summed gradient `grad`.
    pub fn apply(&mut self, grad: &[f64], lr: f64, batch: usize) {
        let scale = lr / batch as f64;
        for (p, g) in self.params.iter_mut().zip(grad) {
            *p -= scale * g;
        }
    }

    /// Adds d(cross-entropy)/d(params) for one example to `grad` (backpropagation).
    fn accumulate_gradient(&self, x: &[f64], label: usize, grad: &mut [f64]) {
        let acts = self.forward(x);
        let layers = self.layers();
        // Softmax + cross-entropy: dL/dlogits = p - onehot(label).
        let mut delta = softmax(&acts[layers.len()]);
        delta[label] -= 1.0;
        let offsets = layer_offsets(&self.shape);
        for l in (0..layers.len()).rev() {
            let layer = &layers[l];
            let g = &mut grad[offsets[l]..offsets[l] + layer.params.len()];
            for (o, &d) in delta.iter().enumerate() {
                for (i, &a) in acts[l].iter().enumerate() {
                    g[o * layer.inputs + i] += d * a;
                }
                g[layer.outputs * layer.inputs + o] += d;
            }
            if l > 0 {
                delta = backprop_tanh(layer, &delta, &acts[l]);
            }
        }
    }

    /// Mean cross-entropy and accuracy over the whole data set. Reporting only, so
    /// libm's `ln` is fine here: it never feeds back into the weights.
    pub fn evaluate(&self, data: &Dataset) -> (f64, f64) {
        let mut loss = 0.0;
        let mut correct = 0usize;
        for r in 0..data.rows {
            let p = self.predict(data.row(r));
            let label = data.labels[r];
            loss -= p[label].max(f64::MIN_POSITIVE).ln();
            if argmax(&p) == label {
                correct += 1;
            }
        }
        let n = data.rows as f64;
        (loss / n, correct as f64 / n)
    }
}

/// Where each layer's parameters start in the flat vector.
fn layer_offsets(shape: &Shape) -> Vec<usize> {
    let mut at = 0;
    shape
        .layers()
        .iter()
        .map(|&(i, o)| {
            let start = at;
            at += o * i + o;
            start
        })
        .collect()
}

/// The error at a tanh layer's output, from the error `delta` of the layer after it:
/// `(W^T delta) * (1 - a^2)`.
fn backprop_tanh(next: &Layer<'_>, delta: &[f64], a: &[f64]) -> Vec<f64> {
    (0..next.inputs)
        .map(|i| {
            let mut s = 0.0;
            for (o, &d) in delta.iter().enumerate() {
                s += next.weight(o, i) * d;
            }
            s * (1.0 - a[i] * a[i])
        })
        .collect()
}

/// Numerically stable softmax.
fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|&v| math::exp(v - m)).collect();
    let mut sum = 0.0;
    for v in &e {
        sum += v;
    }
    e.iter().map(|v| v / sum).collect()
}

/// Index of the largest value (the first one on ties).
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Dataset {
        // Two separable classes on one feature.
        Dataset::from_parts(1, vec![-2.0, -1.0, 1.0, 2.0], vec![0, 0, 1, 1], 2)
    }

    #[test]
    fn param_counts() {
        let lr = Shape {
            features: 4,
            hidden: 0,
            classes: 3,
        };
        assert_eq!(lr.param_count(), 15);
        let mlp = Shape { hidden: 16, ..lr };
        assert_eq!(mlp.param_count(), 16 * 4 + 16 + 3 * 16 + 3);
        assert_eq!(Model::init(mlp, 7).params.len(), mlp.param_count());
    }

    /// Backprop agrees with a finite-difference gradient.
    #[test]
    fn gradient_matches_finite_differences() {
        let shape = Shape {
            features: 1,
            hidden: 3,
            classes: 2,
        };
        let data = toy();
        let model = Model::init(shape, 1);
        let mut grad = vec![0.0; shape.param_count()];
        model.accumulate_gradient(data.row(0), data.labels[0], &mut grad);
        let loss = |m: &Model| -m.predict(data.row(0))[data.labels[0]].ln();
        for (k, &analytic) in grad.iter().enumerate() {
            let (mut plus, mut minus) = (model.clone(), model.clone());
            plus.params[k] += 1e-6;
            minus.params[k] -= 1e-6;
            let numeric = (loss(&plus) - loss(&minus)) / 2e-6;
            assert!((numeric - analytic).abs() < 1e-6, "param {k}");
        }
    }

    #[test]
    fn training_learns_and_is_deterministic() {
        for hidden in [0, 4] {
            let shape = Shape {
                features: 1,
                hidden,
                classes: 2,
            };
            let data = toy();
            let run = || {
                let mut m = Model::init(shape, 3);
                for step in 0..200 {
                    m.sgd_step(&data, 3, step, 2, 0.5);
                }
                m
            };
            let (a, b) = (run(), run());
            let bits = |m: &Model| m.params.iter().map(|p| p.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b));
            let (loss, acc) = a.evaluate(&data);
            assert!(loss < 0.3, "hidden {hidden}: loss {loss}");
            assert_eq!(acc, 1.0);
        }
    }
}
