// Classify images with a quantized model compiled by AOTInductor, from C++ without Python.
//
//   classify PACKAGE.pt2 IMAGE [IMAGE...] [--threads N] [--repeat N] [--logits OUT.f32] [--dump-input OUT.f32]
//   classify PACKAGE.pt2 --raw INPUT.f32 --batch N [--chunk M] [...]   (a preprocessed float32 batch, N x C x H x W,
//                                                                        run M images per call)
//
// PACKAGE comes from `ouromamba-fx export q.safetensors --out vim.pt2 --aoti` (or
// ouromamba_fx.export.compile_aoti); its metadata gives the input shape, the normalisation and the
// class names. The package's custom ops (ouromamba::*) run on the kernels of libouromamba_ops,
// which this program links: loading that library registers them with PyTorch's dispatcher.
//
// Images: binary PPM (P6, 8 bits), and JPEG when the build found libjpeg. An image of the model's
// input size is preprocessed exactly as the Python package does it (pixel / 255, then (x - mean) /
// std, in float32); other sizes are resized (bilinear, shorter side to size / crop_pct) and
// center-cropped, which only approximates the Python transform (PIL's antialiased bicubic).
//
// Output: one line per image, "<file>: <class index> <class name> p=<softmax probability>", then
// with --repeat the latency of one call (median and fastest of N runs after a warm-up run).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "kernels.h"

#if OM_HAVE_JPEG
#include <csetjmp>
#include <cstdio>
#include <jpeglib.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

struct Image {
  int64_t w = 0, h = 0;
  std::vector<uint8_t> rgb;  // h x w x 3
};

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error(msg); }

std::string ext_of(const std::string& path) {
  auto dot = path.rfind('.');
  std::string e = dot == std::string::npos ? "" : path.substr(dot + 1);
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return std::tolower(c); });
  return e;
}

// Binary PPM: "P6", width, height, maxval (< 256), whitespace and # comments between, then pixels.
Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path + ": cannot open");
  auto token = [&]() {
    std::string t;
    char c;
    while (in.get(c)) {
      if (c == '#') {
        while (in.get(c) && c != '\n') {}
      } else if (std::isspace(static_cast<unsigned char>(c))) {
        if (!t.empty()) return t;
      } else {
        t.push_back(c);
      }
    }
    return t;
  };
  if (token() != "P6") fail(path + ": not a binary PPM (P6) image");
  Image im;
  int64_t maxval = 0;
  try {
    im.w = std::stoll(token());
    im.h = std::stoll(token());
    maxval = std::stoll(token());
  } catch (const std::exception&) {
    fail(path + ": broken PPM header");
  }
  if (im.w < 1 || im.h < 1 || im.w * im.h > (int64_t(1) << 28) || maxval < 1 || maxval > 255)
    fail(path + ": unsupported PPM (8-bit images up to 2^28 pixels)");
  im.rgb.resize(static_cast<size_t>(im.w * im.h * 3));
  in.read(reinterpret_cast<char*>(im.rgb.data()), static_cast<std::streamsize>(im.rgb.size()));
  if (!in) fail(path + ": truncated PPM");
  if (maxval != 255)
    for (auto& v : im.rgb) v = static_cast<uint8_t>(std::lround(v * 255.0 / maxval));
  return im;
}

#if OM_HAVE_JPEG
struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char msg[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->msg);
  std::longjmp(err->jump, 1);
}

Image read_jpeg(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail(path + ": cannot open");
  jpeg_decompress_struct cinfo;
  JpegError err;
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_fail;
  Image im;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    std::fclose(f);
    fail(path + ": " + err.msg);
  }
  jpeg_create_decompress(&cinfo);
  jpeg_stdio_src(&cinfo, f);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  if (static_cast<int64_t>(cinfo.image_width) * cinfo.image_height > (int64_t(1) << 28)) {
    jpeg_destroy_decompress(&cinfo);
    std::fclose(f);
    fail(path + ": more than 2^28 pixels");
  }
  jpeg_start_decompress(&cinfo);
  im.w = cinfo.output_width;
  im.h = cinfo.output_height;
  im.rgb.resize(static_cast<size_t>(im.w * im.h * 3));
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = im.rgb.data() + static_cast<size_t>(cinfo.output_scanline) * im.w * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  std::fclose(f);
  return im;
}
#endif

Image read_image(const std::string& path) {
  const std::string e = ext_of(path);
  if (e == "ppm") return read_ppm(path);
#if OM_HAVE_JPEG
  if (e == "jpg" || e == "jpeg") return read_jpeg(path);
  fail(path + ": unsupported image type (PPM or JPEG)");
#else
  fail(path + ": unsupported image type (this build reads PPM only: libjpeg was not found when it was configured)");
#endif
}

// (C, H, W) float32: resized and cropped to (h, w) if needed, then normalised.
at::Tensor preprocess(const Image& im, int64_t h, int64_t w, const std::vector<float>& mean,
                      const std::vector<float>& stdev, double crop_pct) {
  at::Tensor hwc = at::from_blob(const_cast<uint8_t*>(im.rgb.data()), {im.h, im.w, 3}, at::kByte);
  at::Tensor x = hwc.permute({2, 0, 1}).to(at::kFloat).div(255);  // as torchvision's ToTensor
  if (im.h != h || im.w != w) {
    const double scale = std::min(h, w) / crop_pct / std::min(im.h, im.w);
    const int64_t rh = std::max<int64_t>(h, std::llround(im.h * scale)), rw = std::max<int64_t>(w, std::llround(im.w * scale));
    x = at::upsample_bilinear2d(x.unsqueeze(0), {rh, rw}, false).squeeze(0);
    x = x.narrow(1, (rh - h) / 2, h).narrow(2, (rw - w) / 2, w);
  }
  at::Tensor m = at::tensor(mean, at::kFloat).view({-1, 1, 1}), s = at::tensor(stdev, at::kFloat).view({-1, 1, 1});
  return x.sub(m).div(s).contiguous();
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

template <typename T>
std::vector<T> numbers(const std::unordered_map<std::string, std::string>& meta, const std::string& key) {
  auto it = meta.find("ouromamba." + key);
  if (it == meta.end()) fail("the package has no ouromamba." + key + " metadata (export it with ouromamba-fx export)");
  std::vector<T> out;
  for (const auto& t : split(it->second, ',')) out.push_back(static_cast<T>(std::stod(t)));
  return out;
}

at::Tensor read_raw(const std::string& path, const std::vector<int64_t>& shape) {
  at::Tensor x = at::empty(shape, at::kFloat);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path + ": cannot open");
  in.read(reinterpret_cast<char*>(x.data_ptr<float>()), static_cast<std::streamsize>(x.numel() * sizeof(float)));
  if (!in || in.peek() != EOF) fail(path + ": expected exactly " + std::to_string(x.numel()) + " float32 values");
  return x;
}

void write_raw(const std::string& path, const at::Tensor& t) {
  at::Tensor c = t.contiguous().to(at::kFloat);
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(c.data_ptr<float>()), static_cast<std::streamsize>(c.numel() * sizeof(float)));
  if (!out) fail(path + ": cannot write");
}

int usage(const char* prog) {
  std::cerr << "usage: " << prog << " PACKAGE.pt2 IMAGE [IMAGE...] [--threads N] [--repeat N] [--logits OUT.f32]"
            << " [--dump-input OUT.f32]\n       " << prog << " PACKAGE.pt2 --raw INPUT.f32 --batch N [--chunk M] [...]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage(argv[0]);
  std::string package = argv[1], raw, logits_out, input_out;
  std::vector<std::string> images;
  int64_t batch = 0, chunk = 0, threads = 0, repeat = 0;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--raw") raw = value();
      else if (a == "--batch") batch = std::stoll(value());
      else if (a == "--chunk") chunk = std::stoll(value());
      else if (a == "--threads") threads = std::stoll(value());
      else if (a == "--repeat") repeat = std::stoll(value());
      else if (a == "--logits") logits_out = value();
      else if (a == "--dump-input") input_out = value();
      else if (a.rfind("--", 0) == 0) return usage(argv[0]);
      else images.push_back(a);
    } catch (const std::exception& e) {
      std::cerr << "classify: error: " << e.what() << "\n";
      return 2;
    }
  }
  if (raw.empty() == images.empty() || (!raw.empty() && batch < 1)) return usage(argv[0]);
  try {
    if (threads > 0) at::set_num_threads(static_cast<int>(threads));
    torch::inductor::AOTIModelPackageLoader loader(package);
    auto meta = loader.get_metadata();
    const auto shape = numbers<int64_t>(meta, "input_shape");
    if (shape.size() != 3) fail("ouromamba.input_shape must be C,H,W");
    std::vector<std::string> classes;
    if (auto it = meta.find("ouromamba.classes"); it != meta.end()) classes = split(it->second, '\n');

    at::Tensor x;
    if (!raw.empty()) {
      x = read_raw(raw, {batch, shape[0], shape[1], shape[2]});
    } else {
      const auto mean = numbers<float>(meta, "mean"), stdev = numbers<float>(meta, "std");
      const double crop = meta.count("ouromamba.crop_pct") ? std::stod(meta["ouromamba.crop_pct"]) : 1.0;
      if (static_cast<int64_t>(mean.size()) != shape[0] || static_cast<int64_t>(stdev.size()) != shape[0] || shape[0] != 3)
        fail("the package's normalisation does not describe 3-channel images");
      std::vector<at::Tensor> xs;
      for (const auto& path : images) xs.push_back(preprocess(read_image(path), shape[1], shape[2], mean, stdev, crop));
      x = at::stack(xs);
    }
    if (!input_out.empty()) write_raw(input_out, x);

    std::cerr << "package " << package << ": " << (meta.count("ouromamba.model") ? meta["ouromamba.model"] : "?")
              << " " << (meta.count("ouromamba.preset") ? meta["ouromamba.preset"] : "") << "; int8 GEMMs: "
              << (ouromamba_ops::gemm_mode() == 1 ? "torch._int_mm" : "emulated") << "; "
              << at::get_num_threads() << " thread(s)\n";
    std::vector<at::Tensor> parts;
    const int64_t step = chunk > 0 ? chunk : x.size(0);
    for (int64_t i = 0; i < x.size(0); i += step) parts.push_back(loader.run({x.narrow(0, i, std::min(step, x.size(0) - i)).contiguous()}).at(0));
    at::Tensor logits = at::cat(parts).contiguous();
    if (!logits_out.empty()) write_raw(logits_out, logits);
    at::Tensor prob = logits.softmax(-1);
    for (int64_t i = 0; i < logits.size(0); ++i) {
      const int64_t k = logits[i].argmax().item<int64_t>();
      std::cout << (raw.empty() ? images[i] : raw + "[" + std::to_string(i) + "]") << ": " << k << " "
                << (k < static_cast<int64_t>(classes.size()) ? classes[k] : "?") << " p=" << prob[i][k].item<float>()
                << "\n";
    }
    if (repeat > 0) {
      std::vector<double> ms;
      for (int64_t r = 0; r < repeat; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        loader.run({x});
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      std::cout << "latency_ms batch=" << x.size(0) << " runs=" << repeat << " median=" << ms[ms.size() / 2]
                << " min=" << ms.front() << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "classify: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
