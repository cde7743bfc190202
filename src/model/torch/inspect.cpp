// Inspects a TorchScript archive WITHOUT running any of it: compiles every
// class and function the archive's pickles name, exactly as libtorch's own
// loader does, but with an object loader that never calls `__setstate__`
// (torch::jit::load runs it while loading), then lists every operator of
// every compiled function, inlined. The policy (which operators may run)
// is applied by the Rust side (src/model/torch/inspect.rs).
//
// Report, one entry per line:
//   O <function>\t<operator kind>    an operator a function's graph uses
//   P <problem>                      a reason to refuse regardless of operators
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/mobile/file_format.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/csrc/jit/serialization/import_source.h>
#include <caffe2/serialize/in_memory_adapter.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

using namespace torch::jit;
using caffe2::serialize::PyTorchStreamReader;

namespace {

const char* const kCustomClassPrefix = "__torch__.torch.classes.";

bool is_custom_class(const c10::TypePtr& t) {
  if (auto ct = t->cast<c10::ClassType>()) {
    auto n = ct->name();
    return n && n->qualifiedName().rfind(kCustomClassPrefix, 0) == 0;
  }
  return false;
}

// A C++ custom class anywhere inside a type (List[...], Optional[...], ...);
// a scripted class's own attributes are checked where they are read.
bool contains_custom_class(const c10::TypePtr& t) {
  if (is_custom_class(t)) return true;
  if (t->cast<c10::ClassType>()) return false;
  for (const auto& c : t->containedTypes())
    if (contains_custom_class(c)) return true;
  return false;
}

struct Report {
  std::set<std::string> ops;       // "function\tkind"
  std::set<std::string> problems;
};

void walk(const Block* b, const std::string& fn, Report& r) {
  for (const Node* n : b->nodes()) {
    std::string k = n->kind().toQualString();
    r.ops.insert(fn + "\t" + k);
    for (const Value* v : n->outputs())
      if (contains_custom_class(v->type()))
        r.problems.insert(fn + ": " + k + " yields the C++ custom class " + v->type()->repr_str());
    for (const Value* v : n->inputs())
      if (contains_custom_class(v->type()))
        r.problems.insert(fn + ": " + k + " takes the C++ custom class " + v->type()->repr_str());
    for (const Block* sub : n->blocks()) walk(sub, fn, r);
  }
}

// Compiles everything the archive's pickles name, as ScriptModuleDeserializer
// does, with an object loader that never runs __setstate__.
std::shared_ptr<CompilationUnit> compile_only(const char* data, size_t len, Report& r) {
  // the test torch::jit::load makes: flatbuffer files (which run
  // __setstate__ bytecode while loading) are refused
  if (len < 8 || getFileFormat(data) != FileFormat::ZipFileFormat)
    throw std::runtime_error("not a TorchScript zip archive (flatbuffer and other formats are refused)");
  auto rai = std::make_shared<caffe2::serialize::MemoryReadAdapter>(data, len);
  auto reader = std::make_shared<PyTorchStreamReader>(rai);
  for (const auto& rec : reader->getAllRecords()) {
    if (rec == "model.json" || rec.rfind(".data/ts_code/", 0) == 0)
      throw std::runtime_error("a legacy or torch.package archive (" + rec + "), not TorchScript");
  }
  auto cu = std::make_shared<CompilationUnit>();
  auto constants = std::make_shared<std::vector<at::IValue>>();
  auto loader = [reader](const std::string& qualifier) -> std::shared_ptr<Source> {
    std::string path = qualifier;
    std::replace(path.begin(), path.end(), '.', '/');
    path = "code/" + path + ".py";
    if (!reader->hasRecord(path)) return nullptr;
    auto [bytes, size] = reader->getRecord(path);
    return std::make_shared<Source>(
        std::string(static_cast<const char*>(bytes.get()), size), path, 1, nullptr);
  };
  SourceImporter importer(cu, constants.get(), loader, reader->version());
  TypeResolver type_resolver = [&](const c10::QualifiedName& qn) {
    if (qn.qualifiedName().rfind(kCustomClassPrefix, 0) == 0)
      r.problems.insert("the archive holds an object of the C++ custom class " + qn.qualifiedName());
    auto t = importer.loadType(qn);  // compiles the class and what it uses
    return c10::StrongTypePtr(cu, std::move(t));
  };
  ObjLoader obj_loader = [&](const at::StrongTypePtr& type, at::IValue input) {
    auto cls = type.type_->expect<c10::ClassType>();
    size_t n = cls->numAttributes();
    auto obj = c10::ivalue::Object::create(type, n);
    // __setstate__ is compiled (and so inspected) but not run
    if (!cls->findMethod("__setstate__") && input.isGenericDict()) {
      auto dict = input.toGenericDict();
      for (size_t i = 0; i < n; ++i) {
        auto it = dict.find(cls->getAttributeName(i));
        if (it != dict.end()) obj->setSlot(i, it->value());
      }
    }
    return obj;
  };
  auto ctuple = readArchiveAndTensors("constants", "", "", type_resolver, obj_loader,
                                      c10::Device(c10::kCPU), *reader);
  for (const auto& c : ctuple.toTupleRef().elements()) constants->push_back(c);
  readArchiveAndTensors("data", "", "", type_resolver, obj_loader, c10::Device(c10::kCPU),
                        *reader);
  return cu;
}

char* copy_out(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

}  // namespace

extern "C" {

// 0: *out is the report; 1: *out is the error message. *out is malloc'd
// (free it with mlw_torchscript_free); it may be null if allocation failed.
int mlw_torchscript_inspect(const char* data, size_t len, char** out) {
  try {
    Report r;
    auto cu = compile_only(data, len, r);
    for (Function* fn : cu->get_functions()) {
      if (!fn) continue;
      std::string name = fn->qualname().qualifiedName();
      if (!fn->isGraphFunction()) {
        r.problems.insert(name + " is not a TorchScript graph function");
        continue;
      }
      auto g = toGraphFunction(*fn).graph()->copy();
      Inline(*g);
      walk(g->block(), name, r);
    }
    std::string s;
    for (const auto& o : r.ops) s += "O " + o + "\n";
    for (const auto& p : r.problems) s += "P " + p + "\n";
    *out = copy_out(s);
    return 0;
  } catch (const c10::Error& e) {
    *out = copy_out(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *out = copy_out(e.what());
  } catch (...) {
    *out = copy_out("unknown error while reading the TorchScript archive");
  }
  return 1;
}

void mlw_torchscript_free(char* p) { std::free(p); }

}  // extern "C"
