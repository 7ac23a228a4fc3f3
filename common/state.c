/* The inflight journal hot path in C, over the layout common/journal.py documents (popped, replied,
 * pushed), so the native engine writes the very records the Python worker writes. */
#include <stdint.h>
#include <string.h>
#include "state.h"
#define HDR 256u
#define SLOT 64u
static uint64_t *W(struct vfs_jq *q) { return (uint64_t *)q->base; }
int vfs_jq_attach(struct vfs_jq *q, void *region, uint32_t capacity) {
    q->base = region; q->capacity = capacity; q->head = -1; q->word = 0; return 0; }
uint64_t vfs_jq_popped(struct vfs_jq *q, uint16_t head, uint16_t pos, uint32_t opcode,
                       uint64_t unique, int effects) {
    uint64_t *w = W(q); uint64_t nxt = w[0]; uint64_t counter = nxt >> 16;
    uint8_t *s = q->base + HDR + (uint64_t)head * SLOT;
    uint32_t zero = 0; memcpy(s + 8, &zero, 4); memcpy(s + 12, &opcode, 4); memcpy(s + 16, &unique, 8);
    uint64_t word = 1 | (uint64_t)pos << 8 | (counter & ((1ull << 40) - 1)) << 24;
    __atomic_store_n((uint64_t *)s, word, __ATOMIC_RELEASE);
    __atomic_store_n(&w[0], (counter + 1) << 16 | (uint16_t)(pos + 1), __ATOMIC_RELEASE);
    q->head = head; q->word = word;
    if (effects) { w[7] = 0; w[5] = 0; w[6] = 0; __atomic_store_n(&w[4], counter + 1, __ATOMIC_RELEASE); }
    return counter;
}
void vfs_jq_replied(struct vfs_jq *q, uint16_t head, uint32_t used_len, uint16_t used_idx) {
    uint64_t *w = W(q); uint8_t *s = q->base + HDR + (uint64_t)head * SLOT;
    memcpy(s + 8, &used_len, 4);
    uint64_t *sw = (uint64_t *)s;
    __atomic_store_n(sw, (*sw & ~0xFFull) | 3, __ATOMIC_RELEASE);
    w[4] = 0; w[1] = 1ull << 63 | (uint64_t)used_idx << 16 | head; q->head = -1;
}
void vfs_jq_pushed(struct vfs_jq *q, uint16_t head) {
    uint64_t *w = W(q); *(uint64_t *)(q->base + HDR + (uint64_t)head * SLOT) = 0; w[1] = 0; }
