// mlx-moe grouped prefill: platform-neutral helpers (after the platform header).

// erf, Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): Metal has no erf.
PF_FUNC float pf_erf(float x) {
  const float s = x < 0.0f ? -1.0f : 1.0f;
  const float a = x * s;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float y = 1.0f -
      (((((1.061405429f * t - 1.453152027f) * t) + 1.421413741f) * t -
        0.284496736f) * t + 0.254829592f) * t * pf_exp(-a * a);
  return s * y;
}

PF_FUNC float pf_sigmoid(float x) { return 1.0f / (1.0f + pf_exp(-x)); }

// Gated activations, ids as in mlx_moe/kernels/common.py ACT_IDS.
PF_FUNC float pf_act(int act, float g, float u) {
  if (act == 0) {  // silu
    return g * pf_sigmoid(g) * u;
  } else if (act == 1) {  // gelu_tanh
    const float c = 0.7978845608028654f;
    return 0.5f * g * (1.0f + pf_tanh(c * (g + 0.044715f * g * g * g))) * u;
  } else if (act == 2) {  // gelu (erf)
    return 0.5f * g * (1.0f + pf_erf(g * 0.7071067811865476f)) * u;
  } else if (act == 3) {  // relu
    return pf_max(g, 0.0f) * u;
  } else {  // swiglu_oai (gpt-oss): clamp, (up + 1) * gate * sigmoid(1.702 gate)
    g = pf_min(g, 7.0f);
    u = pf_min(pf_max(u, -7.0f), 7.0f);
    return (u + 1.0f) * (g * pf_sigmoid(1.702f * g));
  }
}
