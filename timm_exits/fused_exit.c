/* One early exit in one call: pool -> (LayerNorm) -> (hidden + GELU) -> linear -> statistics -> gate.
 *
 * The reference is `ExitBranch.infer` in timm_exits/model.py; timm_exits/fused.py compiles this file
 * at first use, checks which exits it can serve and falls back to the reference for everything else.
 * Float32 on the CPU, no autograd. Reductions accumulate in float like PyTorch's; their order
 * differs, so results agree with the reference to float rounding, not bit for bit.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NUM_STATS 3

/* Parameters of one exit; pointers are NULL where the layer is absent. Must match `_Plan` in fused.py. */
typedef struct {
    int64_t channels;      /* C: width of the branch-point tensor */
    const float *ln_w, *ln_b;
    float ln_eps;
    const float *hid_w, *hid_b; /* (hidden, C) and (hidden,) */
    int64_t hidden;             /* 0: no hidden layer */
    const float *fc_w, *fc_b;   /* (classes, width) and (classes,) */
    int64_t classes;
    int64_t gate_stats;         /* 1: the gate reads the statistics of exits 0..position */
    int64_t gate_features;      /* 1: the gate reads the pooled features */
    const float *g1_w, *g1_b;   /* (gate_hidden, gate_in), or (1, gate_in) without a hidden layer */
    int64_t gate_hidden;        /* 0: the gate is one linear layer */
    const float *g2_w, *g2_b;   /* (1, gate_hidden) and (1,) */
} exit_plan;

static float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* Mean over `rows` rows of a (rows, channels) view with strides (s_row, s_chan), into out[channels]. */
static void pool(const float *x, int64_t rows, int64_t channels, int64_t s_row, int64_t s_chan, float *out) {
    const float inv = 1.0f / (float)rows;
    if (s_chan == 1) { /* channels last (NHWC, tokens): add whole rows */
        memset(out, 0, sizeof(float) * (size_t)channels);
        for (int64_t r = 0; r < rows; r++) {
            const float *row = x + r * s_row;
            for (int64_t c = 0; c < channels; c++) out[c] += row[c];
        }
        for (int64_t c = 0; c < channels; c++) out[c] *= inv;
    } else if (s_row == 1) { /* channels first (NCHW): one contiguous run per channel */
        for (int64_t c = 0; c < channels; c++) {
            const float *run = x + c * s_chan;
            float acc = 0.0f;
            for (int64_t r = 0; r < rows; r++) acc += run[r];
            out[c] = acc * inv;
        }
    } else {
        for (int64_t c = 0; c < channels; c++) {
            float acc = 0.0f;
            for (int64_t r = 0; r < rows; r++) acc += x[r * s_row + c * s_chan];
            out[c] = acc * inv;
        }
    }
}

static void layer_norm(float *x, int64_t n, const float *w, const float *b, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float scale = 1.0f / sqrtf(var / (float)n + eps);
    for (int64_t i = 0; i < n; i++) x[i] = (x[i] - mean) * scale * w[i] + b[i];
}

/* Max softmax, entropy / log(K) and top-2 margin of one row of logits (see gates.append_stats). */
static void logit_stats(const float *logits, int64_t k, float *out) {
    if (k == 1) {
        out[0] = 1.0f;
        out[1] = 0.0f;
        out[2] = 1.0f;
        return;
    }
    float m = logits[0];
    for (int64_t i = 1; i < k; i++) m = logits[i] > m ? logits[i] : m;
    float sum = 0.0f;
    for (int64_t i = 0; i < k; i++) sum += expf(logits[i] - m);
    const float log_sum = logf(sum);
    float neg_entropy = 0.0f, p1 = -1.0f, p2 = -1.0f;
    for (int64_t i = 0; i < k; i++) {
        const float logp = logits[i] - m - log_sum;
        const float p = expf(logp);
        neg_entropy += p * logp;
        if (p > p1) {
            p2 = p1;
            p1 = p;
        } else if (p > p2) {
            p2 = p;
        }
    }
    out[0] = p1;
    out[1] = neg_entropy * (-1.0f / logf((float)k));
    out[2] = p1 - p2;
}

/* Exit rules, as in timm_exits.policies.exit_mask. */
enum { RULE_NONE = 0, RULE_GATE = 1, RULE_CONFIDENCE = 2, RULE_ENTROPY = 3 };

/* Run one exit on `batch` samples. Sample b's branch-point tensor starts at x + b * s_batch and is
 * pooled over `rows` rows of strides (s_row, s_chan). Writes logits (batch, classes), stats (batch, prev_stats + 3) with the
 * earlier exits' statistics `prev` (batch, prev_stats) copied in front, and gate logits (batch,).
 * With a rule, also writes leave[b] = 1 (when `leave` is not NULL) for the samples that leave under
 * it at `threshold`.
 * Returns the number of samples that leave (0 without a rule), -1 when the scratch memory cannot be
 * allocated, or -2 when a gate value lies within a few float steps of the threshold: PyTorch's
 * sigmoid may round it to the other side, so the caller decides with PyTorch (exit_mask). */
int exit_infer(const exit_plan *p, const float *x, int64_t batch, int64_t s_batch, int64_t rows, int64_t s_row,
                int64_t s_chan, const float *prev, int64_t prev_stats, float *logits, float *stats, float *gate,
                int64_t rule, float threshold, uint8_t *leave) {
    const int64_t width = p->hidden > 0 ? p->hidden : p->channels;
    const int64_t n_stats = prev_stats + NUM_STATS;
    const int64_t gate_in = (p->gate_stats ? n_stats : 0) + (p->gate_features ? width : 0);
    const size_t need = (size_t)(p->channels + p->hidden + gate_in + p->gate_hidden + 1);
    float local[4096]; /* most exits fit: no allocation between two backbone stages */
    float *scratch = need <= 4096 ? local : malloc(sizeof(float) * need);
    if (!scratch) return -1;
    float *pooled = scratch;
    float *hidden = pooled + p->channels;
    float *z = hidden + (p->hidden > 0 ? p->hidden : 0);
    float *gh = z + gate_in;
    int64_t n_leave = 0;
    int ambiguous = 0;
    for (int64_t b = 0; b < batch; b++) {
        pool(x + b * s_batch, rows, p->channels, s_row, s_chan, pooled);
        if (p->ln_w) layer_norm(pooled, p->channels, p->ln_w, p->ln_b, p->ln_eps);
        float *feats = pooled;
        if (p->hidden > 0) {
            for (int64_t j = 0; j < p->hidden; j++) {
                const float h = p->hid_b[j] + dot(p->hid_w + j * p->channels, pooled, p->channels);
                hidden[j] = 0.5f * h * (1.0f + erff(h * 0.70710678118654752f)); /* exact GELU */
            }
            feats = hidden;
        }
        float *out = logits + b * p->classes;
        for (int64_t k = 0; k < p->classes; k++) out[k] = p->fc_b[k] + dot(p->fc_w + k * width, feats, width);
        float *st = stats + b * n_stats;
        if (prev_stats) memcpy(st, prev + b * prev_stats, sizeof(float) * (size_t)prev_stats);
        logit_stats(out, p->classes, st + prev_stats);
        int64_t n = 0;
        if (p->gate_stats) {
            memcpy(z, st, sizeof(float) * (size_t)n_stats);
            n = n_stats;
        }
        if (p->gate_features) memcpy(z + n, feats, sizeof(float) * (size_t)width);
        if (p->gate_hidden > 0) {
            for (int64_t j = 0; j < p->gate_hidden; j++) {
                const float h = p->g1_b[j] + dot(p->g1_w + j * gate_in, z, gate_in);
                gh[j] = h > 0.0f ? h : 0.0f;
            }
            gate[b] = p->g2_b[0] + dot(p->g2_w, gh, p->gate_hidden);
        } else {
            gate[b] = p->g1_b[0] + dot(p->g1_w, z, gate_in);
        }
        if (rule != RULE_NONE) {
            const float *own = st + prev_stats;
            int go;
            if (rule == RULE_GATE) {
                const float sig = 1.0f / (1.0f + expf(-gate[b]));
                go = sig >= threshold;
                ambiguous |= fabsf(sig - threshold) <= 8.0f * FLT_EPSILON * fmaxf(threshold, FLT_MIN);
            } else if (rule == RULE_CONFIDENCE)
                go = own[0] >= threshold;
            else
                go = own[1] <= threshold;
            if (leave) leave[b] = (uint8_t)go;
            n_leave += go;
        }
    }
    if (scratch != local) free(scratch);
    return ambiguous ? -2 : n_leave;
}
