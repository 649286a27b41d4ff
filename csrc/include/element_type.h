// How the torch-free parameter structs (csrc/include/*.h) name element types. The accumulation
// type, float or double, is the template parameter of a struct (patch_covariance's, which accepts
// four input types, derives it from x_type instead); an ElementType code names how an array is
// stored where that may differ from it: patch_covariance's input x, the SINGD steps' parameters
// and gradients (their accumulation type A, or kBFloat16 as raw bits: bf16_bits.h).
#pragma once

namespace kfac_kernels {

enum class ElementType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

template <typename T>
struct ElementTypeOf;
template <>
struct ElementTypeOf<float> {
  static constexpr ElementType value = ElementType::kFloat32;
};
template <>
struct ElementTypeOf<double> {
  static constexpr ElementType value = ElementType::kFloat64;
};

// The code of float or double.
template <typename T>
inline constexpr ElementType element_type_of = ElementTypeOf<T>::value;

}  // namespace kfac_kernels
