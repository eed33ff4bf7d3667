//! Limited-memory BFGS (Nocedal and Wright, *Numerical Optimization*, algorithm 7.4: the
//! two-loop recursion over the last few steps), with a backtracking line search on the Armijo
//! condition. Enough for the handful of parameters of a scaling law, whose objective is smooth
//! to first order (a Huber loss).

/// When a minimization stops.
#[derive(Debug, Clone, Copy)]
pub struct Stop {
    /// Most iterations.
    pub max_iterations: usize,
    /// The largest gradient component below which a point is a minimum.
    pub gradient: f64,
    /// A relative decrease of the objective below which it has stopped moving.
    pub decrease: f64,
}

impl Default for Stop {
    fn default() -> Self {
        Self {
            max_iterations: 2000,
            gradient: 1e-10,
            decrease: 1e-15,
        }
    }
}

/// Where a minimization ended.
#[derive(Debug, Clone)]
pub struct Minimum {
    /// The point.
    pub x: Vec<f64>,
    /// The objective there.
    pub value: f64,
}

/// Steps remembered.
const MEMORY: usize = 10;

/// Minimizes `f` (value and gradient at a point) from `x0`.
pub fn minimize(f: impl Fn(&[f64], &mut [f64]) -> f64, x0: &[f64], stop: Stop) -> Minimum {
    let n = x0.len();
    let mut x = x0.to_vec();
    let mut g = vec![0.0; n];
    let mut value = f(&x, &mut g);
    let mut history: Vec<(Vec<f64>, Vec<f64>, f64)> = Vec::new(); // (s, y, 1 / y.s)
    let mut iterations = 0;
    while iterations < stop.max_iterations && value.is_finite() {
        if g.iter().all(|v| v.abs() < stop.gradient) {
            break;
        }
        iterations += 1;
        // The two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(history.len());
        for (s, y, rho) in history.iter().rev() {
            let a = rho * dot(s, &q);
            axpy(-a, y, &mut q);
            alphas.push(a);
        }
        if let Some((s, y, _)) = history.last() {
            let gamma = dot(s, y) / dot(y, y);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for ((s, y, rho), a) in history.iter().zip(alphas.iter().rev()) {
            let b = rho * dot(y, &q);
            axpy(a - b, s, &mut q);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 || !slope.is_finite() {
            // Not a descent direction: start over along the gradient.
            history.clear();
            d = g.iter().map(|v| -v).collect();
            slope = dot(&g, &d);
        }
        // Backtracking on Armijo's condition.
        let mut step = if history.is_empty() {
            1.0 / norm(&g).max(1e-300)
        } else {
            1.0
        };
        let mut g_new = vec![0.0; n];
        let mut accepted = None;
        for _ in 0..60 {
            let x_new: Vec<f64> = x.iter().zip(&d).map(|(a, b)| a + step * b).collect();
            let v = f(&x_new, &mut g_new);
            if v.is_finite() && v <= value + 1e-4 * step * slope {
                accepted = Some((x_new, v));
                break;
            }
            step *= 0.5;
        }
        let Some((x_new, v)) = accepted else {
            break;
        };
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let ys = dot(&y, &s);
        if ys > 1e-300 {
            if history.len() == MEMORY {
                history.remove(0);
            }
            history.push((s, y, 1.0 / ys));
        }
        let decrease = (value - v) / value.abs().max(1e-300);
        x = x_new;
        g.copy_from_slice(&g_new);
        value = v;
        if decrease < stop.decrease {
            break;
        }
    }
    Minimum { x, value }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rosenbrock_reaches_its_minimum() {
        let f = |x: &[f64], g: &mut [f64]| {
            let (a, b) = (x[0], x[1]);
            g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
            g[1] = 200.0 * (b - a * a);
            (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2)
        };
        let m = minimize(f, &[-1.2, 1.0], Stop::default());
        assert!(
            (m.x[0] - 1.0).abs() < 1e-6 && (m.x[1] - 1.0).abs() < 1e-6,
            "{m:?}"
        );
    }
}
