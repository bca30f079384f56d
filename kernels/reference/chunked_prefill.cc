#include "kernels/reference/chunked_prefill.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace kvbuffer {
namespace {

// Scratch of one chunk of one value head, reused across chunks and calls on a thread.
struct ChunkScratch {
  std::vector<double> G, beta, k, q, L, A, U, W, Vn, o;
  void Resize(int32_t K, int32_t V) {
    const size_t c = kPrefillChunk;
    G.resize(c);
    beta.resize(c);
    k.resize(c * K);
    q.resize(c * K);
    L.resize(c * c);
    A.resize(c * c);
    U.resize(c * V);
    W.resize(c * K);
    Vn.resize(c * V);
    o.resize(c * V);
  }
};

// Runs one chunk of c tokens starting at token s for value head h on the working state Sw
// ([K][V], double) in the UT/WY form; writes outputs and u of the chunk, and advances Sw when
// `update_state`.
void ProcessChunk(const ModelConfig& config, const PreparedTokens& tok, int32_t h, int32_t s,
                  int32_t c, bool update_state, double* Sw, float* out, float* u,
                  ChunkScratch& sc) {
  const int32_t H = config.num_k_heads;
  const int32_t HV = config.num_v_heads;
  const int32_t K = config.head_k_dim;
  const int32_t V = config.head_v_dim;
  const int32_t kh = h / config.group_size();

  // Chunk-local cumulative gates, betas and head vectors in double.
  double acc = 0.0;
  for (int32_t i = 0; i < c; ++i) {
    const size_t t = static_cast<size_t>(s + i);
    acc += tok.g[t * HV + h];
    sc.G[i] = acc;
    sc.beta[i] = tok.beta[t * HV + h];
    const float* kt = tok.k.data() + (t * H + kh) * K;
    const float* qt = tok.q.data() + (t * H + kh) * K;
    for (int32_t d = 0; d < K; ++d) {
      sc.k[static_cast<size_t>(i) * K + d] = kt[d];
      sc.q[static_cast<size_t>(i) * K + d] = qt[d];
    }
  }
  auto krow = [&](int32_t i) { return sc.k.data() + static_cast<size_t>(i) * K; };
  auto qrow = [&](int32_t i) { return sc.q.data() + static_cast<size_t>(i) * K; };
  auto dot = [&](const double* x, const double* y) {
    double r = 0.0;
    for (int32_t d = 0; d < K; ++d) r += x[d] * y[d];
    return r;
  };

  // L = strictly_lower(diag(beta) (K^ K^^T) * Gamma); A = (I + L)^-1 by forward substitution.
  double* L = sc.L.data();
  double* A = sc.A.data();
  for (int32_t i = 0; i < c; ++i) {
    for (int32_t j = 0; j < i; ++j) {
      L[i * c + j] = sc.beta[i] * dot(krow(i), krow(j)) * std::exp(sc.G[i] - sc.G[j]);
    }
  }
  for (int32_t i = 0; i < c; ++i) {
    A[i * c + i] = 1.0;
    for (int32_t j = 0; j < i; ++j) {
      double sum = 0.0;
      for (int32_t l = j; l < i; ++l) sum += L[i * c + l] * A[l * c + j];
      A[i * c + j] = -sum;
    }
  }

  // U = A (beta * V),  W = A (beta * e^G * K^).
  std::fill(sc.U.begin(), sc.U.begin() + static_cast<size_t>(c) * V, 0.0);
  std::fill(sc.W.begin(), sc.W.begin() + static_cast<size_t>(c) * K, 0.0);
  for (int32_t i = 0; i < c; ++i) {
    double* Ui = sc.U.data() + static_cast<size_t>(i) * V;
    double* Wi = sc.W.data() + static_cast<size_t>(i) * K;
    for (int32_t j = 0; j <= i; ++j) {
      const double aij = A[i * c + j] * sc.beta[j];
      const float* vj = tok.v.data() + (static_cast<size_t>(s + j) * HV + h) * V;
      for (int32_t v = 0; v < V; ++v) Ui[v] += aij * vj[v];
      const double wij = aij * std::exp(sc.G[j]);
      const double* kj = krow(j);
      for (int32_t d = 0; d < K; ++d) Wi[d] += wij * kj[d];
    }
  }

  // V_new = U - W S0;  O = diag(e^G) Q^ S0 (+ intra-chunk term below).
  for (int32_t i = 0; i < c; ++i) {
    double* Vi = sc.Vn.data() + static_cast<size_t>(i) * V;
    double* Oi = sc.o.data() + static_cast<size_t>(i) * V;
    const double* Ui = sc.U.data() + static_cast<size_t>(i) * V;
    const double* Wi = sc.W.data() + static_cast<size_t>(i) * K;
    const double* qi = qrow(i);
    std::copy(Ui, Ui + V, Vi);
    std::fill(Oi, Oi + V, 0.0);
    for (int32_t d = 0; d < K; ++d) {
      const double* Srow = Sw + static_cast<size_t>(d) * V;
      const double wd = Wi[d];
      const double qd = qi[d];
      for (int32_t v = 0; v < V; ++v) {
        Vi[v] -= wd * Srow[v];
        Oi[v] += qd * Srow[v];
      }
    }
    const double e = std::exp(sc.G[i]);
    for (int32_t v = 0; v < V; ++v) Oi[v] *= e;
  }
  // O += ((Q^ K^^T) * Gamma, diagonal included) V_new.
  for (int32_t i = 0; i < c; ++i) {
    double* Oi = sc.o.data() + static_cast<size_t>(i) * V;
    for (int32_t j = 0; j <= i; ++j) {
      const double cij = dot(qrow(i), krow(j)) * std::exp(sc.G[i] - sc.G[j]);
      const double* Vj = sc.Vn.data() + static_cast<size_t>(j) * V;
      for (int32_t v = 0; v < V; ++v) Oi[v] += cij * Vj[v];
    }
    float* out_i = out + (static_cast<size_t>(s + i) * HV + h) * V;
    float* u_i = u + (static_cast<size_t>(s + i) * HV + h) * V;
    const double* Vi = sc.Vn.data() + static_cast<size_t>(i) * V;
    for (int32_t v = 0; v < V; ++v) {
      out_i[v] = static_cast<float>(Oi[v]);
      u_i[v] = static_cast<float>(Vi[v]);
    }
  }

  // S_C = e^{G_C} S0 + K^^T diag(e^{G_C - G}) V_new.
  if (!update_state) return;
  const double Gc = sc.G[c - 1];
  const double decay = std::exp(Gc);
  for (int32_t j = 0; j < c; ++j) sc.G[j] = std::exp(Gc - sc.G[j]);  // reuse as coefficients
  for (int32_t d = 0; d < K; ++d) {
    double* Srow = Sw + static_cast<size_t>(d) * V;
    for (int32_t v = 0; v < V; ++v) Srow[v] *= decay;
    for (int32_t j = 0; j < c; ++j) {
      const double cj = sc.G[j] * sc.k[static_cast<size_t>(j) * K + d];
      const double* Vj = sc.Vn.data() + static_cast<size_t>(j) * V;
      for (int32_t v = 0; v < V; ++v) Srow[v] += cj * Vj[v];
    }
  }
}

}  // namespace

void ChunkedPrefill(const ModelConfig& config, float* S, bool state_is_zero,
                    const PreparedTokens& tok, int32_t fold_tokens, float* out, float* u,
                    float* tail_G) {
  const int32_t HV = config.num_v_heads;
  const int32_t K = config.head_k_dim;
  const int32_t V = config.head_v_dim;
  const int32_t T = tok.num_tokens;
  const int32_t fold = std::clamp(fold_tokens, 0, std::max(T, 0));
  const size_t head_elems = static_cast<size_t>(K) * V;

  thread_local ChunkScratch sc;
  thread_local std::vector<double> Sw;
  sc.Resize(K, V);
  Sw.resize(head_elems);

  for (int32_t h = 0; h < HV; ++h) {
    float* Sh = S + static_cast<size_t>(h) * head_elems;
    if (state_is_zero) {
      std::fill(Sw.begin(), Sw.end(), 0.0);
    } else {
      std::copy(Sh, Sh + head_elems, Sw.begin());
    }
    // Tokens [0, fold): folded into the stored state.
    for (int32_t s = 0; s < fold; s += kPrefillChunk) {
      ProcessChunk(config, tok, h, s, std::min(kPrefillChunk, fold - s), true, Sw.data(), out, u,
                   sc);
    }
    for (size_t i = 0; i < head_elems; ++i) Sh[i] = static_cast<float>(Sw[i]);
    // Tokens [fold, T): outputs and u from the evolving working state, which is not stored.
    for (int32_t s = fold; s < T; s += kPrefillChunk) {
      const int32_t c = std::min(kPrefillChunk, T - s);
      ProcessChunk(config, tok, h, s, c, s + c < T, Sw.data(), out, u, sc);
    }
    double acc = 0.0;
    for (int32_t t = fold; t < T; ++t) {
      acc += tok.g[static_cast<size_t>(t) * HV + h];
      tail_G[static_cast<size_t>(t - fold) * HV + h] = static_cast<float>(acc);
    }
  }
}

}  // namespace kvbuffer
