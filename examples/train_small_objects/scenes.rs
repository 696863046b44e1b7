//! Synthetic scenes whose label hangs on small details: two to four small
//! shapes of one kind (6–12 px circles, squares, triangles or crosses) on a
//! cluttered, smoothly varying background. The label is the kind.
//! Training starts on larger shapes (`scene`'s `sides`) and shrinks them to
//! the task's size: see `Curriculum` in `main.rs`.

/// The kinds of shape, in class order.
pub const KINDS: [&str; 4] = ["circle", "square", "triangle", "cross"];

/// One scene: a 3×size×size image with values in [0, 1], its label, and
/// the pixel boxes `[x0, y0, x1, y1)` of its shapes.
pub struct Scene {
    pub image: Vec<f32>,
    pub label: usize,
    pub boxes: Vec<[f32; 4]>,
}

/// The crate's SplitMix64: small, fixed, reproducible everywhere.
pub use autofocus::rng::SplitMix64 as Rng;

/// Side lengths of the task's shapes, pixels: what held-out scenes use.
pub const TASK_SIDES: (f32, f32) = (6.0, 12.0);

/// Draws a scene of `size`×`size` pixels whose shapes have sides in
/// `[sides.0, sides.1)` pixels.
pub fn scene(rng: &mut Rng, size: usize, sides: (f32, f32)) -> Scene {
    let mut image = background(rng, size);
    let label = rng.below(KINDS.len());
    let count = 2 + rng.below(3);
    let mut boxes: Vec<[f32; 4]> = Vec::new();
    let mut tries = 0;
    while boxes.len() < count && tries < 100 {
        tries += 1;
        let side = rng.uniform(sides.0, sides.1);
        let margin = side / 2.0 + 2.0;
        let (cx, cy) = (
            rng.uniform(margin, size as f32 - margin),
            rng.uniform(margin, size as f32 - margin),
        );
        let half = side / 2.0;
        let bbox = [cx - half, cy - half, cx + half, cy + half];
        // Apart from the others by a few pixels, so each stays whole.
        let clear = boxes.iter().all(|b| {
            bbox[0] > b[2] + 3.0
                || b[0] > bbox[2] + 3.0
                || bbox[1] > b[3] + 3.0
                || b[1] > bbox[3] + 3.0
        });
        if !clear {
            continue;
        }
        draw_shape(&mut image, size, rng, label, (cx, cy), side);
        boxes.push(bbox);
    }
    Scene {
        image,
        label,
        boxes,
    }
}

/// A smooth colour field (a few long waves per channel) with soft blobs
/// larger than any shape, and faint pixel noise.
fn background(rng: &mut Rng, size: usize) -> Vec<f32> {
    let plane = size * size;
    let mut image = vec![0.0f32; 3 * plane];
    for channel in image.chunks_exact_mut(plane) {
        let base = rng.uniform(0.25, 0.75);
        let waves: Vec<[f32; 4]> = (0..3)
            .map(|_| {
                let period = rng.uniform(30.0, 120.0);
                let angle = rng.uniform(0.0, std::f32::consts::TAU);
                let k = std::f32::consts::TAU / period;
                [
                    k * angle.cos(),
                    k * angle.sin(),
                    rng.uniform(0.0, 6.3),
                    rng.uniform(0.05, 0.15),
                ]
            })
            .collect();
        for (i, v) in channel.iter_mut().enumerate() {
            let (x, y) = ((i % size) as f32, (i / size) as f32);
            *v = base
                + waves
                    .iter()
                    .map(|w| w[3] * (w[0] * x + w[1] * y + w[2]).sin())
                    .sum::<f32>();
        }
    }
    for _ in 0..4 + rng.below(5) {
        let (bx, by) = (rng.uniform(0.0, size as f32), rng.uniform(0.0, size as f32));
        let sigma = rng.uniform(8.0, 20.0);
        let amp: [f32; 3] = std::array::from_fn(|_| rng.uniform(-0.3, 0.3));
        for (i, _) in (0..plane).enumerate() {
            let (x, y) = ((i % size) as f32 - bx, (i / size) as f32 - by);
            let g = (-(x * x + y * y) / (2.0 * sigma * sigma)).exp();
            for (c, a) in amp.iter().enumerate() {
                image[c * plane + i] += a * g;
            }
        }
    }
    for v in &mut image {
        *v = (*v + rng.uniform(-0.03, 0.03)).clamp(0.0, 1.0);
    }
    image
}

/// Paints shape `kind` of `side` pixels centred at `centre`, in a colour
/// that stands out from the background there.
fn draw_shape(
    image: &mut [f32],
    size: usize,
    rng: &mut Rng,
    kind: usize,
    (cx, cy): (f32, f32),
    side: f32,
) {
    let plane = size * size;
    let at = |x: usize, y: usize| y * size + x;
    let (ix, iy) = ((cx as usize).min(size - 1), (cy as usize).min(size - 1));
    let local: f32 = (0..3).map(|c| image[c * plane + at(ix, iy)]).sum::<f32>() / 3.0;
    // Brighter on a dark spot, darker on a bright one, by at least 0.35.
    let target = if local < 0.5 {
        rng.uniform((local + 0.35).min(1.0), 1.0)
    } else {
        rng.uniform(0.0, (local - 0.35).max(0.0))
    };
    let tint: [f32; 3] = std::array::from_fn(|_| (target + rng.uniform(-0.1, 0.1)).clamp(0.0, 1.0));
    let half = side / 2.0;
    let bar = side / 3.0;
    let inside = |x: f32, y: f32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match kind {
            0 => dx * dx + dy * dy <= half * half,
            1 => dx.abs() <= half && dy.abs() <= half,
            // Apex up, base at the bottom: |dx| within the width at this height.
            2 => dy.abs() <= half && dx.abs() <= (dy + half) / 2.0,
            _ => {
                (dx.abs() <= bar / 2.0 && dy.abs() <= half)
                    || (dy.abs() <= bar / 2.0 && dx.abs() <= half)
            }
        }
    };
    let lo_x = (cx - half - 1.0).max(0.0) as usize;
    let lo_y = (cy - half - 1.0).max(0.0) as usize;
    let hi_x = ((cx + half + 1.0) as usize).min(size - 1);
    let hi_y = ((cy + half + 1.0) as usize).min(size - 1);
    for y in lo_y..=hi_y {
        for x in lo_x..=hi_x {
            if inside(x as f32 + 0.5, y as f32 + 0.5) {
                for (c, t) in tint.iter().enumerate() {
                    image[c * plane + at(x, y)] = *t;
                }
            }
        }
    }
}

/// ImageNet normalisation (what `autofocus classify` applies to files).
pub fn normalise(image: &[f32], size: usize) -> Vec<f32> {
    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];
    let plane = size * size;
    image
        .iter()
        .enumerate()
        .map(|(i, v)| (v - MEAN[i / plane]) / STD[i / plane])
        .collect()
}

/// The fraction of the image the boxes cover (union, by pixel centres).
pub fn box_area_fraction(boxes: &[[f32; 4]], size: usize) -> f32 {
    let covered = (0..size * size)
        .filter(|i| {
            let (x, y) = ((i % size) as f32 + 0.5, (i / size) as f32 + 0.5);
            in_boxes(boxes, x, y)
        })
        .count();
    covered as f32 / (size * size) as f32
}

/// True when pixel point `(x, y)` lies in one of the boxes.
pub fn in_boxes(boxes: &[[f32; 4]], x: f32, y: f32) -> bool {
    boxes
        .iter()
        .any(|b| x >= b[0] && x < b[2] && y >= b[1] && y < b[3])
}
