// faiss_c_shim.cpp: the FAISS C API functions Affinity calls, for systems whose FAISS ships
// the C API headers but no libfaiss_c (Debian 12's libfaiss-dev 1.7.3). CMake compiles this
// file only when it finds no libfaiss_c. Each function matches the declaration in
// <faiss/c_api/...> exactly and follows the C API's conventions: 0 on success, a negative
// FaissErrorCode on failure with the message kept for faiss_get_last_error(). No C++
// exception crosses into C.
#include <faiss/AutoTune.h>
#include <faiss/IndexFlat.h>
#include <faiss/impl/AuxIndexStructures.h>
#include <faiss/impl/FaissException.h>
#include <faiss/impl/IDSelector.h>
#include <faiss/index_factory.h>
#include <faiss/utils/distances.h>

#include <exception>
#include <new>
#include <string>

extern "C" {
#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/IndexFlat_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/impl/AuxIndexStructures_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/utils/distances_c.h>
}

namespace
{

thread_local std::string last_error;

template <typename F> int guarded(F &&body)
{
    try {
        body();
        return 0;
    } catch (const faiss::FaissException &e) {
        last_error = e.what();
        return -2; // FAISS_EXCEPTION
    } catch (const std::bad_alloc &) {
        last_error = "out of memory";
        return -4; // STD_EXCEPTION
    } catch (const std::exception &e) {
        last_error = e.what();
        return -4;
    } catch (...) {
        last_error = "unknown exception";
        return -1; // UNKNOWN_EXCEPT
    }
}

faiss::Index *index_of(FaissIndex *p)
{
    return reinterpret_cast<faiss::Index *>(p);
}

const faiss::Index *index_of(const FaissIndex *p)
{
    return reinterpret_cast<const faiss::Index *>(p);
}

} // namespace

extern "C" {

const char *faiss_get_last_error()
{
    return last_error.empty() ? nullptr : last_error.c_str();
}

void faiss_Index_free(FaissIndex *obj)
{
    delete index_of(obj);
}

idx_t faiss_Index_ntotal(const FaissIndex *index)
{
    return index_of(index)->ntotal;
}

int faiss_Index_add(FaissIndex *index, idx_t n, const float *x)
{
    return guarded([&] { index_of(index)->add(n, x); });
}

int faiss_Index_search(const FaissIndex *index, idx_t n, const float *x, idx_t k, float *distances,
                       idx_t *labels)
{
    return guarded([&] { index_of(index)->search(n, x, k, distances, labels); });
}

int faiss_Index_remove_ids(FaissIndex *index, const FaissIDSelector *sel, size_t *n_removed)
{
    return guarded([&] {
        size_t n = index_of(index)->remove_ids(*reinterpret_cast<const faiss::IDSelector *>(sel));
        if (n_removed) *n_removed = n;
    });
}

int faiss_IndexFlatIP_new_with(FaissIndexFlatIP **p_index, idx_t d)
{
    return guarded(
        [&] { *p_index = reinterpret_cast<FaissIndexFlatIP *>(new faiss::IndexFlatIP(d)); });
}

int faiss_IndexFlatL2_new_with(FaissIndexFlatL2 **p_index, idx_t d)
{
    return guarded(
        [&] { *p_index = reinterpret_cast<FaissIndexFlatL2 *>(new faiss::IndexFlatL2(d)); });
}

void faiss_IndexFlat_xb(FaissIndexFlat *index, float **p_xb, size_t *p_size)
{
    auto *flat = dynamic_cast<faiss::IndexFlat *>(reinterpret_cast<faiss::Index *>(index));
    if (!flat) {
        *p_xb = nullptr;
        *p_size = 0;
        return;
    }
    *p_xb = flat->get_xb();
    *p_size = flat->codes.size() / sizeof(float);
}

int faiss_IDSelectorRange_new(FaissIDSelectorRange **p_sel, idx_t imin, idx_t imax)
{
    return guarded([&] {
        *p_sel = reinterpret_cast<FaissIDSelectorRange *>(new faiss::IDSelectorRange(imin, imax));
    });
}

void faiss_IDSelectorRange_free(FaissIDSelectorRange *obj)
{
    delete reinterpret_cast<faiss::IDSelectorRange *>(obj);
}

int faiss_index_factory(FaissIndex **p_index, int d, const char *description,
                        FaissMetricType metric)
{
    return guarded([&] {
        *p_index = reinterpret_cast<FaissIndex *>(
            faiss::index_factory(d, description, static_cast<faiss::MetricType>(metric)));
    });
}

int faiss_ParameterSpace_new(FaissParameterSpace **space)
{
    return guarded(
        [&] { *space = reinterpret_cast<FaissParameterSpace *>(new faiss::ParameterSpace()); });
}

void faiss_ParameterSpace_free(FaissParameterSpace *obj)
{
    delete reinterpret_cast<faiss::ParameterSpace *>(obj);
}

int faiss_ParameterSpace_set_index_parameter(const FaissParameterSpace *space, FaissIndex *index,
                                             const char *name, double value)
{
    return guarded([&] {
        reinterpret_cast<const faiss::ParameterSpace *>(space)->set_index_parameter(index_of(index),
                                                                                    name, value);
    });
}

void faiss_set_distance_compute_blas_threshold(int value)
{
    faiss::distance_compute_blas_threshold = value;
}

} // extern "C"
